//! bincode (serde, standard config) with a bound on what decoding may allocate.
//!
//! bincode allocates a container's claimed length before reading it, so a few garbage
//! bytes claiming a 2^60-byte string would abort the process. Every decode of bytes that
//! come from disk or the network goes through [`decode`], which sets bincode's byte limit
//! from the input's size (16 times its length, rounded up to a power of two: more than any
//! valid encoding needs, since a primitive never decodes to more than 16 bytes per encoded
//! byte), so a decode allocates at most that much before it fails.

use serde::de::DeserializeOwned;
use serde::Serialize;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| e.to_string())
}

/// Appends the encoding of a value to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

macro_rules! decode_with_limit {
    ($bytes:expr, $bits:expr, [$($b:literal),*]) => {
        match $bits {
            $($b => bincode::serde::decode_from_slice($bytes, config().with_limit::<{ 1usize << $b }>())
                .map(|(v, _)| v)
                .map_err(|e| e.to_string()),)*
            _ => Err(format!("{} bytes are too many to decode", $bytes.len())),
        }
    };
}

/// Decodes a value from bytes of any origin: an error, never a panic or an allocation
/// beyond 16 times the input's size.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let budget = bytes.len().saturating_mul(16).max(1 << 12);
    let bits = usize::BITS - (budget - 1).leading_zeros();
    decode_with_limit!(
        bytes,
        bits,
        [
            12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
            34, 35, 36, 37, 38, 39, 40
        ]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_huge_claimed_length_is_an_error() {
        // A varint length prefix claiming about 2^56 bytes of string.
        let mut b = vec![0xfd];
        b.extend_from_slice(&(1u64 << 56).to_le_bytes());
        assert!(decode::<String>(&b).is_err());
        assert!(decode::<Vec<u64>>(&b).is_err());
        assert!(decode::<Vec<String>>(&b).is_err());
    }

    #[test]
    fn large_valid_values_round_trip() {
        let v: Vec<u64> = (0..200_000).collect();
        assert_eq!(decode::<Vec<u64>>(&encode(&v).unwrap()).unwrap(), v);
        let s: Vec<String> = (0..10_000).map(|i| format!("item-{i}")).collect();
        assert_eq!(decode::<Vec<String>>(&encode(&s).unwrap()).unwrap(), s);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            drop(decode::<Vec<String>>(&bytes));
            drop(decode::<(u16, Vec<(u64, String)>, std::collections::BTreeMap<String, f32>)>(&bytes));
        }
    }
}
