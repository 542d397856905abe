//! PCR selections and values in the text and file forms operators use:
//! the tpm2-tools syntax `sha1:0,2+sha256:0,1,2,7`, and the "values" file
//! (`tpm2_pcrread -o`, `tpm2_quote -o -F values`): the digests concatenated
//! in selection order.

use crate::wire::{HashAlg, MAX_PCR_BANKS, MAX_PCRS_PER_BANK, PcrBankSelection, PcrBankValues};

/// Parses `BANK:I,J,...[+BANK:...]` into banks in ascending algorithm order
/// with indices ascending and unique: the order the wire requires and the
/// order a guest quotes in.
pub fn parse_pcr_list(text: &str) -> Result<Vec<PcrBankSelection>, String> {
    let mut banks: Vec<PcrBankSelection> = Vec::new();
    for part in text.split('+').take(MAX_PCR_BANKS + 1) {
        let (bank, list) = part
            .split_once(':')
            .ok_or_else(|| format!("{part:?}: expected BANK:INDEX,... e.g. sha256:0,1,7"))?;
        let hash_alg =
            HashAlg::from_name(bank.trim()).ok_or_else(|| format!("unknown PCR bank {bank:?}"))?;
        if banks.iter().any(|b| b.hash_alg == hash_alg) {
            return Err(format!("bank {bank} listed twice"));
        }
        let mut pcrs = Vec::new();
        for item in list.split(',').take(MAX_PCRS_PER_BANK + 1) {
            let index: u8 = item
                .trim()
                .parse()
                .map_err(|_| format!("{item:?} is not a PCR index"))?;
            if usize::from(index) >= MAX_PCRS_PER_BANK {
                return Err(format!("PCR {index} is out of range 0..=23"));
            }
            pcrs.push(index);
        }
        pcrs.sort_unstable();
        pcrs.dedup();
        banks.push(PcrBankSelection { hash_alg, pcrs });
    }
    if banks.len() > MAX_PCR_BANKS {
        return Err(format!("more than {MAX_PCR_BANKS} banks"));
    }
    banks.sort_by_key(|b| b.hash_alg);
    Ok(banks)
}

/// Splits a "values" file into the banks of `selection`; its length must
/// be exactly the sum of the selected digests.
pub fn split_pcr_values(
    selection: &[PcrBankSelection],
    raw: &[u8],
) -> Result<Vec<PcrBankValues>, String> {
    let want: usize = selection
        .iter()
        .map(|b| b.pcrs.len() * b.hash_alg.digest_len())
        .sum();
    if raw.len() != want {
        return Err(format!(
            "PCR values file has {} bytes; the selection needs {want}",
            raw.len()
        ));
    }
    let mut rest = raw;
    let mut out = Vec::with_capacity(selection.len());
    for bank in selection {
        let len = bank.hash_alg.digest_len();
        let mut values = std::collections::BTreeMap::new();
        for index in &bank.pcrs {
            let (digest, tail) = rest.split_at(len);
            values.insert(*index, digest.to_vec());
            rest = tail;
        }
        out.push(PcrBankValues {
            hash_alg: bank.hash_alg,
            values,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_in_wire_order() {
        let s = parse_pcr_list("sha256:7,0,1,1+sha1:2,0").unwrap();
        assert_eq!(s[0].hash_alg, HashAlg::Sha1);
        assert_eq!(s[0].pcrs, [0, 2]);
        assert_eq!(s[1].pcrs, [0, 1, 7]);
        for bad in [
            "sha256",
            "md5:0",
            "sha1:24",
            "sha1:x",
            "sha1:",
            "sha1:0+sha1:1",
        ] {
            assert!(parse_pcr_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn splits_values_exactly() {
        let s = parse_pcr_list("sha1:0,2+sha256:7").unwrap();
        let raw: Vec<u8> = (0u8..(2 * 20 + 32)).collect();
        let v = split_pcr_values(&s, &raw).unwrap();
        assert_eq!(v[0].values[&2], raw[20..40]);
        assert_eq!(v[1].values[&7], raw[40..]);
        assert!(split_pcr_values(&s, &raw[1..]).is_err());
    }
}
