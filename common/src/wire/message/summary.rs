//! One-line summaries of messages for logs: types, sizes and ids, never
//! key material or raw peer bytes.

use super::*;

// ---------------------------------------------------------------- summary

/// A one-line description of a message that is safe to log: names (which
/// the decoder restricted to a harmless character set), numbers, lengths
/// and states; never key material, nonces, evidence bytes or other raw
/// peer data.
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a>(&'a Message);

impl Message {
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

pub(super) fn write_features_summary(
    f: &mut fmt::Formatter<'_>,
    features: &Features,
) -> fmt::Result {
    write!(f, "features={{")?;
    for (i, (id, state)) in features.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(f, "{sep}{id}:{state:?}")?;
    }
    write!(f, "}}")
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.message_type())?;
        match self.0 {
            Message::Hello(m) => write!(
                f,
                " versions={}..={} agent={}/{}",
                m.min_version, m.max_version, m.agent_name, m.agent_version
            ),
            Message::Challenge(m) => {
                write!(f, " version={} vm-id={}", m.version, m.vm_id)?;
                if let Some(cid) = m.cid {
                    write!(f, " cid={cid}")?;
                }
                for bank in &m.pcr_selection {
                    write!(f, " pcrs[{:?}]={:?}", bank.hash_alg, bank.pcrs)?;
                }
                f.write_str(" ")?;
                write_features_summary(f, &m.features)
            }
            Message::Evidence(m) => {
                write!(
                    f,
                    " attest={}B signature={}B ak-name={}B ak-cert={}",
                    m.tpm_attest.len(),
                    m.tpm_signature.len(),
                    m.ak_name.len(),
                    m.ak_cert
                        .as_ref()
                        .map_or("none".to_owned(), |c| format!("{}B", c.len()))
                )?;
                for bank in &m.pcr_values {
                    write!(
                        f,
                        " pcrs[{:?}]={:?}",
                        bank.hash_alg,
                        bank.values.keys().collect::<Vec<_>>()
                    )?;
                }
                Ok(())
            }
            Message::AttestationResult(m) => write!(f, " reattest-after={}s", m.reattest_after_s),
            Message::KeyRequest(m) => {
                let names: Vec<&str> = m.names.iter().map(KeyName::as_str).collect();
                write!(f, " names={names:?}")
            }
            Message::KeyRelease(m) => {
                for k in &m.released {
                    write!(
                        f,
                        " released={}@v{}({}B)",
                        k.name,
                        k.version,
                        k.material.expose().len()
                    )?;
                }
                for k in &m.refused {
                    write!(f, " refused={}:{}", k.name, k.code.name())?;
                }
                Ok(())
            }
            Message::DeriveRequest(m) => write!(f, " purpose={} length={}", m.purpose, m.length),
            Message::DeriveConfirm(m) => write!(f, " purpose={}", m.purpose),
            Message::KeyUpdate(m) => write!(
                f,
                " update-id={} key={}@v{}({}B)",
                m.update_id,
                m.key.name,
                m.key.version,
                m.key.material.expose().len()
            ),
            Message::KeyUpdateAck(m) => {
                write!(
                    f,
                    " update-id={} key={}@v{}",
                    m.update_id, m.name, m.version
                )?;
                match m.error {
                    Some(code) => write!(f, " error={code}"),
                    None => Ok(()),
                }
            }
            Message::Ping(m) => write!(f, " sequence={}", m.sequence),
            Message::Pong(m) => write!(f, " sequence={}", m.sequence),
            Message::Error(m) => {
                write!(f, " code={}", m.code)?;
                if let Some(ms) = m.retry_after_ms {
                    write!(f, " retry-after={ms}ms")?;
                }
                if let Some(v) = m.supported {
                    write!(f, " supported={}..={}", v.min, v.max)?;
                }
                if let Some(d) = &m.detail {
                    write!(f, " detail={:?}", d.as_str())?;
                }
                Ok(())
            }
            Message::Goodbye(m) => {
                write!(f, " reason={:?}", m.reason)?;
                match m.retry_after_ms {
                    Some(ms) => write!(f, " retry-after={ms}ms"),
                    None => Ok(()),
                }
            }
            Message::FeatureUpdate(m) => {
                f.write_str(" ")?;
                write_features_summary(f, &m.features)
            }
        }
    }
}
