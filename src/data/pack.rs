//! Sample packing: examples laid end to end in rows of at most `max_len` tokens, placed by
//! best-fit decreasing exactly as TRL's `pack_dataset(strategy="bfd")` places them (longest
//! first, ties in dataset order; each into the open row with the least room that still fits,
//! the oldest such row first; a new row when none fits). Examples never split across rows.

use std::collections::{BTreeMap, VecDeque};

/// Rows of example indices, in the order TRL emits them; within a row, in placement order.
/// Empty examples are left out, as TRL filters them; longer ones than `max_len` get a row of
/// their own (the encoder has already truncated them to `max_seq_len`).
pub fn pack_bfd(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
    // By truncated length, stable: equal lengths keep their dataset order, as Arrow's sort does.
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i].min(max_len)));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Open rows by the room they have left, oldest first.
    let mut by_room: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i].min(max_len);
        let fit = by_room.range_mut(len..).next().map(|(room, q)| {
            let row = q.pop_front().expect("no empty queues are kept");
            (*room, row, q.is_empty())
        });
        let (room, row) = match fit {
            Some((room, row, emptied)) => {
                if emptied {
                    by_room.remove(&room);
                }
                (room, row)
            }
            None => {
                rows.push(Vec::new());
                (max_len, rows.len() - 1)
            }
        };
        rows[row].push(i);
        let left = room - len;
        if left > 0 {
            by_room.entry(left).or_default().push_back(row);
        }
    }
    rows
}

/// How full packed rows are, for the job's log.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PackingSummary {
    pub rows: usize,
    pub examples: usize,
    pub examples_per_row: f64,
    /// Tokens over `rows * max_len`.
    pub fill: f64,
}

pub fn summarize(rows: &[Vec<usize>], lengths: &[usize], max_len: usize) -> PackingSummary {
    let examples: usize = rows.iter().map(Vec::len).sum();
    let tokens: usize = rows
        .iter()
        .flatten()
        .map(|&i| lengths[i].min(max_len))
        .sum();
    let n = rows.len().max(1) as f64;
    PackingSummary {
        rows: rows.len(),
        examples,
        examples_per_row: examples as f64 / n,
        fill: tokens as f64 / (n * max_len as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of TRL's `pack_dataset` docstring: lengths 5, 2, 3, 1 into rows of 4 (the
    /// 5 truncated to 4) give [[0], [2, 3], [1]].
    #[test]
    fn packs_as_trls_docstring_example() {
        assert_eq!(
            pack_bfd(&[5, 2, 3, 1], 4),
            vec![vec![0], vec![2, 3], vec![1]]
        );
    }

    #[test]
    fn best_fit_takes_the_tightest_row_and_the_oldest_among_equals() {
        // The two 6s open two rows with room 4 each; the 4 fills the older one; the 3 goes to
        // the other (room 1 left); the 2 fits nowhere and opens a third; the 1 takes the
        // tightest room, the 1 left in the second row.
        assert_eq!(
            pack_bfd(&[3, 6, 1, 6, 4, 2], 10),
            vec![vec![1, 4], vec![3, 0, 2], vec![5]]
        );
        let rows = pack_bfd(&[3, 6, 1, 6, 4, 2], 10);
        let s = summarize(&rows, &[3, 6, 1, 6, 4, 2], 10);
        assert_eq!((s.rows, s.examples), (3, 6));
        assert!((s.fill - 22.0 / 30.0).abs() < 1e-12);
        assert_eq!(
            pack_bfd(&[0, 2], 4),
            vec![vec![1]],
            "empty examples are dropped"
        );
    }
}
