//! Compressed sparse rows: the only matrix layout ALS trains on (never dense users x items).

use rayon::prelude::*;

/// A CSR matrix of f32 values with u32 column indices.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Csr {
    pub rows: usize,
    pub cols: usize,
    /// `indptr[r]..indptr[r + 1]` is row `r`'s slice of `indices` and `data`.
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub data: Vec<f32>,
}

impl Csr {
    /// Builds from `(row, col, value)` triples; duplicates are summed, columns sorted.
    pub fn from_triples(rows: usize, cols: usize, triples: &[(u32, u32, f32)]) -> Csr {
        let mut counts = vec![0usize; rows + 1];
        for &(r, _, _) in triples {
            counts[r as usize + 1] += 1;
        }
        for i in 0..rows {
            counts[i + 1] += counts[i];
        }
        let mut next = counts.clone();
        let mut indices = vec![0u32; triples.len()];
        let mut data = vec![0f32; triples.len()];
        for &(r, c, v) in triples {
            let p = next[r as usize];
            indices[p] = c;
            data[p] = v;
            next[r as usize] += 1;
        }
        // Sort each row by column and merge duplicates.
        let mut out_indptr = Vec::with_capacity(rows + 1);
        out_indptr.push(0);
        let mut out_idx = Vec::with_capacity(triples.len());
        let mut out_data = Vec::with_capacity(triples.len());
        let mut row_buf: Vec<(u32, f32)> = Vec::new();
        for r in 0..rows {
            row_buf.clear();
            row_buf.extend((counts[r]..counts[r + 1]).map(|p| (indices[p], data[p])));
            row_buf.sort_unstable_by_key(|e| e.0);
            for &(c, v) in &row_buf {
                if out_idx.len() > *out_indptr.last().unwrap_or(&0) && out_idx.last() == Some(&c) {
                    if let Some(d) = out_data.last_mut() {
                        *d += v;
                    }
                } else {
                    out_idx.push(c);
                    out_data.push(v);
                }
            }
            out_indptr.push(out_idx.len());
        }
        Csr {
            rows,
            cols,
            indptr: out_indptr,
            indices: out_idx,
            data: out_data,
        }
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Column indices and values of row `r`.
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[r], self.indptr[r + 1]);
        (&self.indices[a..b], &self.data[a..b])
    }

    /// Number of entries in row `r`.
    pub fn row_len(&self, r: usize) -> usize {
        self.indptr[r + 1] - self.indptr[r]
    }

    /// The transpose (CSR of the columns), built in O(nnz).
    pub fn transpose(&self) -> Csr {
        let mut counts = vec![0usize; self.cols + 1];
        for &c in &self.indices {
            counts[c as usize + 1] += 1;
        }
        for i in 0..self.cols {
            counts[i + 1] += counts[i];
        }
        let mut next = counts.clone();
        let mut indices = vec![0u32; self.nnz()];
        let mut data = vec![0f32; self.nnz()];
        for r in 0..self.rows {
            let (cols, vals) = self.row(r);
            for (&c, &v) in cols.iter().zip(vals) {
                let p = next[c as usize];
                indices[p] = r as u32;
                data[p] = v;
                next[c as usize] += 1;
            }
        }
        Csr {
            rows: self.cols,
            cols: self.rows,
            indptr: counts,
            indices,
            data,
        }
    }

    /// Applies `f` to every stored value, in parallel.
    pub fn map_values(&self, f: impl Fn(f32) -> f32 + Sync) -> Csr {
        let mut out = self.clone();
        out.data.par_iter_mut().for_each(|v| *v = f(*v));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triples_sum_duplicates_and_transpose_round_trips() {
        let t = vec![
            (0, 2, 1.0),
            (1, 0, 2.0),
            (0, 2, 0.5),
            (0, 1, 3.0),
            (2, 2, 4.0),
        ];
        let m = Csr::from_triples(3, 3, &t);
        assert_eq!(m.row(0), (&[1u32, 2][..], &[3.0f32, 1.5][..]));
        assert_eq!(m.row(1), (&[0u32][..], &[2.0f32][..]));
        assert_eq!(m.nnz(), 4);
        let tt = m.transpose();
        assert_eq!(tt.row(2), (&[0u32, 2][..], &[1.5f32, 4.0][..]));
        assert_eq!(tt.transpose(), m);
    }
}
