//! Batches: seeded shuffling per epoch, optional length grouping or packed rows, right padding
//! with masks or examples laid end to end in one row.

use candle_core::{Device, Tensor};

use super::encode::{Example, IGNORE};
use crate::rng::Rng;

/// A padded batch on a device.
pub struct Batch {
    /// `[batch, seq]` u32.
    pub input_ids: Tensor,
    /// `[batch, seq]` u32, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]` i64, `IGNORE` for padding and prompts.
    pub labels: Tensor,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Tokens that count in the loss (after the one-position shift).
    pub target_tokens: usize,
    /// For examples laid end to end in one row (`collate_packed`): their lengths, in order;
    /// empty for a padded batch.
    pub lengths: Vec<usize>,
}

/// Labels that count in an example's loss: every position but the first can be predicted.
pub fn target_tokens(e: &Example) -> usize {
    e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
}

/// Lay a group of examples end to end in one `[1, total]` row, without padding. The model
/// restarts positions at each example and keeps attention inside it (`forward_loss_packed`),
/// so the loss and gradients are the padded batch's.
pub fn collate_packed(examples: &[&Example], device: &Device) -> candle_core::Result<Batch> {
    let total: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let mut ids = Vec::with_capacity(total);
    let mut labels = Vec::with_capacity(total);
    let mut lengths = Vec::with_capacity(examples.len());
    for e in examples {
        ids.extend_from_slice(&e.input_ids);
        labels.extend_from_slice(&e.labels);
        lengths.push(e.input_ids.len());
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (1, total), device)?,
        attention_mask: Tensor::ones((1, total), candle_core::DType::U32, device)?,
        labels: Tensor::from_vec(labels, (1, total), device)?,
        tokens: total,
        target_tokens: examples.iter().map(|e| target_tokens(e)).sum(),
        lengths,
    })
}

/// Pad a group of examples into a batch.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let b = examples.len();
    let s = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let mut ids = vec![pad_id; b * s];
    let mut mask = vec![0u32; b * s];
    let mut labels = vec![IGNORE; b * s];
    let mut tokens = 0;
    let mut target_tokens = 0;
    for (i, e) in examples.iter().enumerate() {
        let n = e.input_ids.len();
        ids[i * s..i * s + n].copy_from_slice(&e.input_ids);
        mask[i * s..i * s + n].fill(1);
        labels[i * s..i * s + n].copy_from_slice(&e.labels);
        tokens += n;
        target_tokens += self::target_tokens(e);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, s), device)?,
        attention_mask: Tensor::from_vec(mask, (b, s), device)?,
        labels: Tensor::from_vec(labels, (b, s), device)?,
        tokens,
        target_tokens,
        lengths: Vec::new(),
    })
}

/// The order examples are visited in, epoch by epoch: a pure function of (seed, epoch), so a
/// resumed run can jump to any position.
#[derive(Debug, Clone)]
pub struct Batcher {
    pub batch_size: usize,
    pub shuffle: bool,
    pub group_by_length: bool,
    pub seed: u64,
    /// With packing: the packed rows (example indices, see `data::pack`); a batch is then
    /// `batch_size` rows, shuffled as rows.
    pub packed_rows: Option<Vec<Vec<usize>>>,
}

impl Batcher {
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        match &self.packed_rows {
            Some(rows) => rows.len().div_ceil(self.batch_size),
            None => n.div_ceil(self.batch_size),
        }
    }

    /// Example indices of each batch of `epoch`.
    pub fn epoch_batches(&self, examples: &[Example], epoch: usize) -> Vec<Vec<usize>> {
        if let Some(rows) = &self.packed_rows {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            if self.shuffle {
                let mut rng = Rng::new(self.seed).fork(epoch as u64 + 1);
                for i in (1..order.len()).rev() {
                    let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
            }
            return order
                .chunks(self.batch_size)
                .map(|c| c.iter().flat_map(|&r| rows[r].iter().copied()).collect())
                .collect();
        }
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut rng = Rng::new(self.seed).fork(epoch as u64 + 1);
        if self.shuffle {
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        if self.group_by_length {
            // Sort within windows of 50 batches so similar lengths share a batch, then shuffle
            // the batches: less padding, still random.
            let window = self.batch_size * 50;
            for chunk in order.chunks_mut(window) {
                chunk.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
            }
        }
        let mut batches: Vec<Vec<usize>> =
            order.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        if self.group_by_length && self.shuffle {
            for i in (1..batches.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                batches.swap(i, j);
            }
        }
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize) -> Example {
        Example {
            input_ids: (0..n as u32).collect(),
            labels: (0..n as i64).collect(),
        }
    }

    #[test]
    fn collate_pads_right_and_masks() {
        let (a, b) = (ex(3), ex(5));
        let batch = collate(&[&a, &b], 99, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap()[0],
            vec![0, 1, 2, 99, 99]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap()[0],
            vec![1, 1, 1, 0, 0]
        );
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap()[0],
            vec![0, 1, 2, IGNORE, IGNORE]
        );
        assert_eq!(batch.tokens, 8);
        assert_eq!(batch.target_tokens, 2 + 4);
    }

    #[test]
    fn collate_packed_lays_examples_end_to_end() {
        let (a, b) = (ex(3), ex(5));
        let batch = collate_packed(&[&a, &b], &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap()[0],
            vec![0, 1, 2, 0, 1, 2, 3, 4]
        );
        assert_eq!(batch.lengths, vec![3, 5]);
        assert_eq!((batch.tokens, batch.target_tokens), (8, 2 + 4));
    }

    #[test]
    fn shuffling_is_seeded_per_epoch_and_covers_everything() {
        let data: Vec<Example> = (1..=10).map(ex).collect();
        let b = Batcher {
            batch_size: 3,
            shuffle: true,
            group_by_length: false,
            seed: 7,
            packed_rows: None,
        };
        let e0 = b.epoch_batches(&data, 0);
        assert_eq!(e0, b.epoch_batches(&data, 0));
        assert_ne!(e0, b.epoch_batches(&data, 1));
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(e0.len(), b.batches_per_epoch(10));
    }

    #[test]
    fn packed_batches_are_rows_shuffled_whole() {
        let data: Vec<Example> = [3, 6, 1, 6, 4, 2].map(ex).to_vec();
        let lengths: Vec<usize> = data.iter().map(|e| e.input_ids.len()).collect();
        let rows = crate::data::pack::pack_bfd(&lengths, 10);
        let b = Batcher {
            batch_size: 2,
            shuffle: true,
            group_by_length: false,
            seed: 7,
            packed_rows: Some(rows.clone()),
        };
        assert_eq!(b.batches_per_epoch(data.len()), 2);
        let e0 = b.epoch_batches(&data, 0);
        assert_eq!(e0.len(), 2);
        // Every batch is whole rows, and the epoch covers every example once.
        for batch in &e0 {
            let mut rest = batch.as_slice();
            while !rest.is_empty() {
                let row = rows
                    .iter()
                    .find(|r| rest.starts_with(r))
                    .expect("a whole row");
                rest = &rest[row.len()..];
            }
        }
        let mut all = e0.concat();
        all.sort();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
    }
}
