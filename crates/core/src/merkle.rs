//! The Merkle tree over the audit log (RFC 6962 §2.1, RFC 9162 §2.1):
//! tree hashes, inclusion (audit path) and consistency proofs, and their
//! verification. Pure: the store keeps the node hashes and this module says
//! which ones a proof needs.
//!
//! Leaf `i` (0-based) is the event with `seq = i + 1`, and its leaf input is
//! the event's canonical bytes ([`crate::audit::canonical_bytes`]), so a
//! verifier needs only the event itself, never its neighbours:
//!
//! ```text
//! leaf_hash(e)  = SHA-256(0x00 || canonical(e))
//! node_hash(l,r) = SHA-256(0x01 || l || r)
//! ```
//!
//! The tree of size `n` covers events `1..=n`; a checkpoint at `seq = n`
//! signs its root. The store keeps the hash of every *complete* subtree
//! (level `l`, index `i`: leaves `i·2^l .. (i+1)·2^l`); the hash of any
//! range the proofs need is folded from at most 64 of them
//! ([`subtrees`]), so a proof costs O(log n) reads.

use std::ops::Range;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::audit::Hash;

/// The most hashes a proof may hold: a tree of `u64` leaves is 64 levels
/// deep, and a consistency proof may add one more.
pub const PROOF_LEN_MAX: usize = 65;

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A complete subtree: level `level`, covering leaves
/// `index << level .. (index + 1) << level`. Level 0 is a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subtree {
    pub level: u8,
    pub index: u64,
}

impl Subtree {
    pub fn leaves(&self) -> Range<u64> {
        (self.index << self.level)..((self.index + 1) << self.level)
    }
}

/// The complete subtrees whose hashes fold into the hash of `range`, left
/// to right, largest first. Every range the proofs of this module ask for
/// starts at a multiple of a power of two at least as large as its length,
/// so the pieces shrink strictly and fold as RFC 6962 splits (at the
/// largest power of two below the length).
pub fn subtrees(range: Range<u64>) -> Vec<Subtree> {
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let left = range.end - at;
        // The largest power of two that fits the rest and keeps `at` aligned.
        let mut level = 63 - left.leading_zeros() as u8;
        if at != 0 {
            level = level.min(at.trailing_zeros() as u8);
        }
        out.push(Subtree {
            level,
            index: at >> level,
        });
        at += 1u64 << level;
    }
    out
}

/// The hash of a range from the hashes of its [`subtrees`], in order:
/// `node(s1, node(s2, ... node(s_{k-1}, s_k)))`.
pub fn fold(hashes: &[Hash]) -> Option<Hash> {
    let (last, rest) = hashes.split_last()?;
    Some(rest.iter().rev().fold(*last, |acc, h| node_hash(h, &acc)))
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The ranges whose hashes form the inclusion proof of leaf `index` in the
/// tree of `size` (RFC 9162 §2.1.3.1 `PATH`), nearest the leaf first.
pub fn inclusion_ranges(index: u64, size: u64) -> Result<Vec<Range<u64>>, ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange { index, size });
    }
    let mut out = Vec::new();
    let (mut lo, mut hi, m) = (0u64, size, index);
    // Walk down from the root, then reverse: the proof lists the sibling
    // of the leaf first.
    while hi - lo > 1 {
        let k = split(hi - lo);
        if m < lo + k {
            out.push((lo + k)..hi);
            hi = lo + k;
        } else {
            out.push(lo..(lo + k));
            lo += k;
        }
    }
    out.reverse();
    Ok(out)
}

/// The ranges whose hashes form the consistency proof from the tree of
/// `old` to the tree of `new` (RFC 9162 §2.1.4.1 `SUBPROOF`). Empty when
/// `old == new` or `old == 0`.
pub fn consistency_ranges(old: u64, new: u64) -> Result<Vec<Range<u64>>, ProofError> {
    if old > new {
        return Err(ProofError::Shrunk { old, new });
    }
    let mut out = Vec::new();
    if old == 0 || old == new {
        return Ok(out);
    }
    let (mut lo, mut hi, mut m, mut whole) = (0u64, new, old, true);
    loop {
        let n = hi - lo;
        if m == n {
            if !whole {
                out.push(lo..hi);
            }
            break;
        }
        let k = split(n);
        if m <= k {
            out.push((lo + k)..hi);
            hi = lo + k;
        } else {
            out.push(lo..(lo + k));
            lo += k;
            m -= k;
            whole = false;
        }
    }
    out.reverse();
    Ok(out)
}

/// What a set of ranges needs from the store: every complete subtree
/// (sorted, without duplicates), read at once, then folded per range.
#[derive(Debug, Clone)]
pub struct Plan {
    pieces: Vec<Vec<Subtree>>,
    nodes: Vec<Subtree>,
}

impl Plan {
    pub fn new(ranges: &[Range<u64>]) -> Plan {
        let pieces: Vec<Vec<Subtree>> = ranges.iter().map(|r| subtrees(r.clone())).collect();
        let mut nodes: Vec<Subtree> = pieces.iter().flatten().copied().collect();
        nodes.sort_unstable();
        nodes.dedup();
        Plan { pieces, nodes }
    }

    /// The subtrees to read, sorted.
    pub fn nodes(&self) -> &[Subtree] {
        &self.nodes
    }

    /// The hash of each range from the hashes of [`Plan::nodes`], in that
    /// order; `None` if `got` does not hold one hash per node.
    pub fn hashes(&self, got: &[Hash]) -> Option<Vec<Hash>> {
        if got.len() != self.nodes.len() {
            return None;
        }
        self.pieces
            .iter()
            .map(|p| {
                let hashes: Option<Vec<Hash>> = p
                    .iter()
                    .map(|s| self.nodes.binary_search(s).ok().map(|i| got[i]))
                    .collect();
                fold(&hashes?)
            })
            .collect()
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProofError {
    #[error("leaf {index} is outside a tree of size {size}")]
    OutOfRange { index: u64, size: u64 },
    #[error("a tree of size {new} cannot extend one of size {old}")]
    Shrunk { old: u64, new: u64 },
    #[error("the proof has {got} hashes, a proof for these sizes has {want}")]
    Length { got: usize, want: usize },
    #[error("the proof does not lead to the signed root")]
    RootMismatch,
    #[error("the proof does not lead to the earlier root")]
    OldRootMismatch,
    #[error("trees of equal size have different roots")]
    Forked,
}

/// Checks that `leaf` (a leaf hash) is leaf `index` of the tree of `size`
/// with `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange { index, size });
    }
    let want = inclusion_ranges(index, size)?.len();
    if proof.len() != want {
        return Err(ProofError::Length {
            got: proof.len(),
            want,
        });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::Length {
                got: proof.len(),
                want,
            });
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 || r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `new` with `new_root` extends the tree of `old`
/// with `old_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    let want = consistency_ranges(old, new)?.len();
    if proof.len() != want {
        return Err(ProofError::Length {
            got: proof.len(),
            want,
        });
    }
    if old == 0 {
        return Ok(());
    }
    if old == new {
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::Forked)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (old - 1, new - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::Length { got: 0, want });
    };
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s == 0 {
            return Err(ProofError::Length {
                got: proof.len(),
                want,
            });
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if s != 0 || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a tree: the hashes of the complete subtrees that make
/// up `size` leaves, largest first (one per set bit of `size`). Appending
/// a leaf needs nothing else, so the store keeps it beside the chain head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    hashes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// From the hashes of [`subtrees`]`(0..size)`, in that order.
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Result<Frontier, String> {
        if hashes.len() != size.count_ones() as usize {
            return Err(format!(
                "a tree of {size} leaves has {} edge hashes, found {}",
                size.count_ones(),
                hashes.len()
            ));
        }
        Ok(Frontier { size, hashes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The edge hashes, largest subtree first.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// Appends a leaf (its input bytes); returns every complete subtree the
    /// leaf completes, the leaf itself first.
    pub fn push(&mut self, leaf: &[u8]) -> Vec<(Subtree, Hash)> {
        let index = self.size;
        let mut h = leaf_hash(leaf);
        let mut out = vec![(Subtree { level: 0, index }, h)];
        let mut level = 0u8;
        let mut i = index;
        while i & 1 == 1 {
            // INVARIANT: a set bit of `size` at `level` is the last edge hash.
            let Some(left) = self.hashes.pop() else {
                break;
            };
            h = node_hash(&left, &h);
            level += 1;
            i >>= 1;
            out.push((Subtree { level, index: i }, h));
        }
        self.hashes.push(h);
        self.size += 1;
        out
    }

    /// The root of the tree so far.
    pub fn root(&self) -> Hash {
        fold(&self.hashes).unwrap_or_else(empty_root)
    }

    /// `size: u64 || hashes`, as the store keeps it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.hashes.len());
        out.extend_from_slice(&self.size.to_be_bytes());
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<Frontier, String> {
        let (size, rest) = b
            .split_first_chunk::<8>()
            .ok_or("tree edge is shorter than its size field")?;
        if rest.len() % 32 != 0 {
            return Err("tree edge is not a whole number of hashes".into());
        }
        let hashes = rest
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Frontier::from_parts(u64::from_be_bytes(*size), hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Hash {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).expect("test vector is 32 bytes of hex");
        out
    }

    // The RFC 6962 test vectors of transparency-dev/merkle (Go),
    // `proof/verify_test.go` (`leaves`, `roots`, `inclusionProofs`,
    // `consistencyProofs`), as published by the Certificate Transparency
    // projects. Their leaf numbers are 1-based; ours are 0-based indexes.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    /// (leaf number, 1-based; tree size; proof)
    const INCLUSION: &[(u64, u64, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            3,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            2,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    /// (old size, new size, proof)
    const CONSISTENCY: &[(u64, u64, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    fn leaves() -> Vec<Vec<u8>> {
        LEAVES
            .iter()
            .map(|s| hex::decode(s).expect("hex"))
            .collect()
    }

    /// MTH straight from the RFC's recursive definition: the reference the
    /// stored-subtree code is compared with.
    fn mth(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// Every complete subtree of a tree built by pushing `leaves`.
    fn nodes(leaves: &[Vec<u8>]) -> (Frontier, std::collections::BTreeMap<Subtree, Hash>) {
        let mut f = Frontier::new();
        let mut all = std::collections::BTreeMap::new();
        for l in leaves {
            all.extend(f.push(l));
        }
        (f, all)
    }

    fn prove(all: &std::collections::BTreeMap<Subtree, Hash>, ranges: &[Range<u64>]) -> Vec<Hash> {
        let plan = Plan::new(ranges);
        let got: Vec<Hash> = plan.nodes().iter().map(|s| all[s]).collect();
        plan.hashes(&got).expect("every node is there")
    }

    #[test]
    fn roots_match_the_published_vectors() {
        let leaves = leaves();
        for (n, want) in ROOTS.iter().enumerate() {
            let (f, _) = nodes(&leaves[..=n]);
            assert_eq!(f.root(), h(want), "size {}", n + 1);
            assert_eq!(mth(&leaves[..=n]), h(want), "size {}", n + 1);
        }
        assert_eq!(
            Frontier::new().root(),
            h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
    }

    #[test]
    fn inclusion_proofs_match_the_published_vectors() {
        let leaves = leaves();
        let (_, all) = nodes(&leaves);
        for (leaf, size, proof) in INCLUSION {
            let want: Vec<Hash> = proof.iter().map(|s| h(s)).collect();
            let index = leaf - 1;
            let got = prove(&all, &inclusion_ranges(index, *size).expect("in range"));
            assert_eq!(got, want, "leaf {leaf} of {size}");
            let root = h(ROOTS[*size as usize - 1]);
            let lh = leaf_hash(&leaves[index as usize]);
            assert_eq!(verify_inclusion(index, *size, &lh, &want, &root), Ok(()));
        }
    }

    #[test]
    fn consistency_proofs_match_the_published_vectors() {
        let leaves = leaves();
        let (_, all) = nodes(&leaves);
        for (old, new, proof) in CONSISTENCY {
            let want: Vec<Hash> = proof.iter().map(|s| h(s)).collect();
            let got = prove(&all, &consistency_ranges(*old, *new).expect("grows"));
            assert_eq!(got, want, "{old} -> {new}");
            let (r1, r2) = (h(ROOTS[*old as usize - 1]), h(ROOTS[*new as usize - 1]));
            assert_eq!(verify_consistency(*old, *new, &r1, &r2, &want), Ok(()));
        }
    }

    /// The corruptions the reference implementation probes its verifier
    /// with (`corruptInclusionProof`, `corruptConsistencyProof`): each must
    /// fail.
    #[test]
    fn corrupted_proofs_fail() {
        let leaves = leaves();
        let some = h("abacaba000000000000000000000000000000000000000000060061e00123456");
        for (leaf, size, proof) in INCLUSION.iter().filter(|v| !v.2.is_empty()) {
            let proof: Vec<Hash> = proof.iter().map(|s| h(s)).collect();
            let root = h(ROOTS[*size as usize - 1]);
            let i = leaf - 1;
            let lh = leaf_hash(&leaves[i as usize]);
            let bad = |i: u64, size: u64, lh: &Hash, p: &[Hash], root: &Hash| {
                verify_inclusion(i, size, lh, p, root).is_err()
            };
            assert!(bad(i.wrapping_sub(1), *size, &lh, &proof, &root));
            assert!(bad(i + 1, *size, &lh, &proof, &root));
            assert!(bad(i ^ 2, *size, &lh, &proof, &root));
            assert!(bad(i, size * 2, &lh, &proof, &root));
            assert!(bad(i, size / 2, &lh, &proof, &root));
            assert!(bad(i, *size, &leaf_hash(b"WrongLeaf"), &proof, &root));
            assert!(bad(i, *size, &lh, &proof, &empty_root()));
            assert!(bad(i, *size, &lh, &proof, &some));
            let mut longer = proof.clone();
            longer.push(root);
            assert!(bad(i, *size, &lh, &longer, &root));
            let mut front = vec![root];
            front.extend_from_slice(&proof);
            assert!(bad(i, *size, &lh, &front, &root));
            for k in 0..proof.len() {
                let mut flipped = proof.clone();
                flipped[k][0] ^= 8;
                assert!(bad(i, *size, &lh, &flipped, &root), "flip {k}");
            }
            assert!(bad(i, *size, &lh, &proof[..proof.len() - 1], &root));
        }
        for (old, new, proof) in CONSISTENCY.iter().filter(|v| !v.2.is_empty()) {
            let proof: Vec<Hash> = proof.iter().map(|s| h(s)).collect();
            let (r1, r2) = (h(ROOTS[*old as usize - 1]), h(ROOTS[*new as usize - 1]));
            let bad = |o: u64, n: u64, a: &Hash, b: &Hash, p: &[Hash]| {
                verify_consistency(o, n, a, b, p).is_err()
            };
            assert!(bad(old - 1, *new, &r1, &r2, &proof));
            assert!(bad(old + 1, *new, &r1, &r2, &proof));
            assert!(bad(old ^ 2, *new, &r1, &r2, &proof));
            assert!(bad(*old, new * 2, &r1, &r2, &proof));
            assert!(bad(*old, new / 2, &r1, &r2, &proof));
            assert!(bad(*old, *new, &some, &r2, &proof));
            assert!(bad(*old, *new, &r1, &some, &proof));
            assert!(bad(*old, *new, &r2, &r1, &proof));
            assert!(bad(*old, *new, &r1, &r2, &[]));
            for extra in [r1, r2, proof[0]] {
                let mut longer = proof.clone();
                longer.push(extra);
                assert!(bad(*old, *new, &r1, &r2, &longer));
                let mut front = vec![extra];
                front.extend_from_slice(&proof);
                assert!(bad(*old, *new, &r1, &r2, &front));
            }
            assert!(bad(*old, *new, &r1, &r2, &proof[..proof.len() - 1]));
            for k in 0..proof.len() {
                let mut flipped = proof.clone();
                flipped[k][0] ^= 16;
                assert!(bad(*old, *new, &r1, &r2, &flipped), "flip {k}");
            }
        }
    }

    #[test]
    fn trivial_consistency_cases() {
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        assert_eq!(verify_consistency(0, 0, &a, &a, &[]), Ok(()));
        assert_eq!(verify_consistency(0, 1, &a, &b, &[]), Ok(()));
        assert_eq!(verify_consistency(1, 1, &a, &a, &[]), Ok(()));
        assert_eq!(
            verify_consistency(1, 1, &a, &b, &[]),
            Err(ProofError::Forked)
        );
        assert!(verify_consistency(1, 0, &a, &b, &[]).is_err());
        assert!(verify_consistency(2, 1, &a, &b, &[]).is_err());
        assert!(verify_consistency(1, 2, &a, &b, &[]).is_err());
        assert!(verify_consistency(0, 1, &a, &b, &[a]).is_err());
    }

    /// Every proof for every size up to 70 from stored subtrees agrees with
    /// the recursive definition and verifies.
    #[test]
    fn stored_subtree_proofs_agree_with_the_definition() {
        let leaves: Vec<Vec<u8>> = (0u32..70).map(|i| i.to_be_bytes().to_vec()).collect();
        let (_, all) = nodes(&leaves);
        let roots: Vec<Hash> = (0..=leaves.len()).map(|n| mth(&leaves[..n])).collect();
        for n in 1..=leaves.len() as u64 {
            let root = roots[n as usize];
            let whole = 0..n;
            let ranged = prove(&all, std::slice::from_ref(&whole));
            assert_eq!(ranged, vec![root], "root of {n}");
            for i in 0..n {
                let p = prove(&all, &inclusion_ranges(i, n).expect("in range"));
                let lh = leaf_hash(&leaves[i as usize]);
                assert_eq!(verify_inclusion(i, n, &lh, &p, &root), Ok(()), "{i} of {n}");
            }
            for m in 0..=n {
                let p = prove(&all, &consistency_ranges(m, n).expect("grows"));
                assert_eq!(
                    verify_consistency(m, n, &roots[m as usize], &root, &p),
                    Ok(()),
                    "{m} -> {n}"
                );
            }
        }
    }

    #[test]
    fn frontier_roundtrips_and_refuses_bad_bytes() {
        let leaves = leaves();
        let (f, _) = nodes(&leaves[..7]);
        let back = Frontier::from_bytes(&f.to_bytes()).expect("roundtrip");
        assert_eq!(back, f);
        assert!(Frontier::from_bytes(&[0; 7]).is_err());
        let mut short = f.to_bytes();
        short.truncate(short.len() - 32);
        assert!(Frontier::from_bytes(&short).is_err());
        assert!(Frontier::from_bytes(&[&f.to_bytes()[..], &[0]].concat()).is_err());
    }

    #[test]
    fn subtrees_are_aligned_and_shrink() {
        assert_eq!(
            subtrees(0..7),
            vec![
                Subtree { level: 2, index: 0 },
                Subtree { level: 1, index: 2 },
                Subtree { level: 0, index: 6 }
            ]
        );
        assert_eq!(subtrees(8..12), vec![Subtree { level: 2, index: 2 }]);
        assert!(subtrees(5..5).is_empty());
    }
}
