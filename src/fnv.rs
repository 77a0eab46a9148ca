//! 64-bit FNV-1a: a hash that is stable across platforms and Rust releases (unlike `std`'s
//! `DefaultHasher`), for what must not change between runs: the validation carve-out by id and
//! the lexical model's feature buckets.

pub const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues hashing `bytes` from `hash` (start from [`OFFSET`]).
pub fn extend(hash: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(hash, |h, b| (h ^ b as u64).wrapping_mul(PRIME))
}

pub fn hash(text: &str) -> u64 {
    extend(OFFSET, text.bytes())
}

#[cfg(test)]
mod tests {
    /// Pinned: a change would move items across the validation split and invalidate every
    /// trained lexical model.
    #[test]
    fn hash_is_pinned() {
        assert_eq!(super::hash("deal"), 0xa5bc_1a67_4255_7fcf);
        assert_eq!(super::extend(super::hash("de"), *b"al"), super::hash("deal"));
    }
}
