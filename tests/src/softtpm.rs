//! The insecure soft vTPM of load generation, which lives in the host
//! crate's drill module (`vkx_host::drill::softtpm`: the drills' synthetic
//! guests use it too); re-exported here for the load generator and the
//! fault-injection suite. Only with the `insecure-soft-tpm` feature.

pub use vkx_host::drill::softtpm::*;
