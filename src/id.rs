//! 128-bit identifiers: request ids (made by clients) and lease ids (made by servers).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 128-bit identifier, written on the wire as 32 lowercase hex digits.
///
/// Used for request ids (made by the client) and lease ids (made by the server).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Id(pub [u8; 16]);

impl Id {
    /// A fresh identifier from the operating system's CSPRNG.
    pub fn random() -> Id {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // Only where the OS has no entropy source at all. Request ids must still differ
            // (two acquires sharing one would share a grant): the time, the process and a
            // counter make each unique. Lease ids, the secrets, come from the server's own
            // generator.
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNT: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let unique =
                COUNT.fetch_add(1, Ordering::Relaxed) ^ u64::from(std::process::id()) << 40;
            bytes[..8].copy_from_slice(&nanos.to_le_bytes());
            bytes[8..].copy_from_slice(&unique.to_le_bytes());
        }
        Id(bytes)
    }

    /// A fresh request id without a system call: SipHash (keyed from the OS's randomness
    /// once per process) of a process-wide counter. Unpredictable and, at 128 bits,
    /// practically unique across clients; one `getrandom` call per acquire was a tenth of
    /// the client's system calls under load.
    pub fn fresh() -> Id {
        use std::hash::{BuildHasher, RandomState};
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let (a, b) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&a.hash_one(n).to_le_bytes());
        bytes[8..].copy_from_slice(&b.hash_one(n).to_le_bytes());
        Id(bytes)
    }

    pub(crate) fn parse_hex(s: &str) -> Option<Id> {
        let raw = s.as_bytes();
        if raw.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in raw.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Id(out))
    }
}

impl Id {
    /// The 32 lowercase hex digits, without going through `fmt` once per byte: ids are
    /// written into every request and answer.
    fn hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        out
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        f.write_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids are bearer secrets for their lease: show only a prefix.
        write!(f, "Id({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex = self.hex();
        s.serialize_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Id::parse_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 32 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_differ() {
        let ids: std::collections::HashSet<Id> = (0..10_000).map(|_| Id::fresh()).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn id_round_trips_through_json() {
        let id = Id::random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json.len(), 34);
        assert_eq!(serde_json::from_str::<Id>(&json).unwrap(), id);
        assert!(serde_json::from_str::<Id>("\"zz\"").is_err());
        assert!(serde_json::from_str::<Id>(&format!("\"{}\"", "g".repeat(32))).is_err());
    }

    #[test]
    fn ids_are_written_as_lowercase_hex_bytes_in_order() {
        let id = Id([
            0x00, 0x01, 0x0a, 0x10, 0x7f, 0x80, 0xab, 0xff, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc,
            0xde, 0xf0,
        ]);
        let expected = "00010a107f80abff123456789abcdef0";
        assert_eq!(id.to_string(), expected);
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            format!("\"{expected}\"")
        );
    }
}
