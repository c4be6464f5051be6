//! Item embeddings in one growing row-major matrix, indexed by item id.

use ndarray::ArrayView2;
use troupe_models::dataset::IdMap;

/// Embeddings of the catalogue's items for the content branch.
#[derive(Debug, Default)]
pub struct ContentIndex {
    pub encoder: String,
    dim: usize,
    ids: IdMap,
    data: Vec<f32>,
    /// Hash of the text each row was computed from (0: row empty or deleted).
    text_hash: Vec<u128>,
    /// Rows with an embedding.
    live: usize,
}

impl ContentIndex {
    pub fn new(dim: usize, encoder: String) -> Self {
        ContentIndex {
            encoder,
            dim,
            ..Default::default()
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Sets an item's embedding.
    pub fn set(&mut self, id: &str, text_hash: u128, v: &[f32]) {
        if v.len() != self.dim {
            return;
        }
        let i = self.ids.intern(id) as usize;
        if i >= self.text_hash.len() {
            self.text_hash.resize(i + 1, 0);
            self.data.resize((i + 1) * self.dim, 0.0);
        }
        if self.text_hash[i] == 0 {
            self.live += 1;
        }
        self.text_hash[i] = text_hash;
        self.data[i * self.dim..(i + 1) * self.dim].copy_from_slice(v);
    }

    /// Clears an item's embedding (deleted items never score).
    pub fn remove(&mut self, id: &str) {
        if let Some(i) = self.ids.get(id) {
            let i = i as usize;
            if self.text_hash[i] != 0 {
                self.live -= 1;
            }
            self.text_hash[i] = 0;
            self.data[i * self.dim..(i + 1) * self.dim].fill(0.0);
        }
    }

    /// Text hash an item's row was computed from.
    pub fn text_hash(&self, id: &str) -> Option<u128> {
        self.ids
            .get(id)
            .map(|i| self.text_hash[i as usize])
            .filter(|h| *h != 0)
    }

    pub fn index(&self, id: &str) -> Option<u32> {
        self.ids
            .get(id)
            .filter(|&i| self.text_hash[i as usize] != 0)
    }

    pub fn name(&self, i: u32) -> Option<&str> {
        self.ids.name(i)
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The matrix (rows = items by index; deleted rows are zero).
    pub fn matrix(&self) -> ArrayView2<'_, f32> {
        let rows = self.text_hash.len();
        ArrayView2::from_shape((rows, self.dim), &self.data[..rows * self.dim])
            .unwrap_or_else(|_| ArrayView2::from_shape((0, 0), &[]).expect("empty view"))
    }

    pub fn row(&self, id: &str) -> Option<&[f32]> {
        let i = self.index(id)? as usize;
        Some(&self.data[i * self.dim..(i + 1) * self.dim])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replace_remove_keep_counts_and_rows() {
        let mut c = ContentIndex::new(2, "e".into());
        c.set("a", 1, &[1.0, 0.0]);
        c.set("b", 2, &[0.0, 1.0]);
        c.set("a", 3, &[0.5, 0.5]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.row("a"), Some(&[0.5, 0.5][..]));
        c.remove("a");
        c.remove("a");
        assert_eq!(c.len(), 1);
        assert_eq!(c.index("a"), None);
        assert_eq!(c.matrix().nrows(), 2);
        c.set("x", 4, &[1.0]);
        assert_eq!(c.len(), 1, "wrong width is ignored");
    }
}
