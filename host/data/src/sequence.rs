//! From text to training rows: tokenisation with EOS, per-token loss masks, packing into fixed blocks
//! (optionally keeping documents apart), and a deterministic, seeded order of micro-batches.

use super::chat_template::RenderedChat;
use super::template::{Segment, SftText};
use anyhow::{bail, Result};
use dusflow_model::Tokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One training row: token ids, which tokens are targets, and (for packed rows that keep documents apart)
/// the document of each token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `learn[i]`: token `i` is predicted from tokens `..i` and counts in the loss (`learn[0]` is unused).
    pub learn: Vec<bool>,
    /// Document index of each token when documents must not see each other (block-diagonal attention,
    /// positions restarting per document); `None` for plain causal rows.
    pub doc_ids: Option<Vec<u32>>,
}

impl TrainSequence {
    /// Number of tokens that count in the loss.
    pub fn target_count(&self) -> usize {
        self.learn.iter().skip(1).filter(|&&l| l).count()
    }
}

/// A pretraining document's ids: the tokenizer's own specials (e.g. BOS) then the text, then EOS.
pub fn tokenize_document(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true)?;
    let Some(eos) = tok.eos_id() else {
        bail!("the tokenizer has no EOS token; pretraining appends one per document")
    };
    ids.push(eos);
    Ok(ids)
}

/// Concatenates documents and cuts the stream into rows of exactly `block` tokens, dropping the remainder
/// (the run_clm `group_texts` convention). With `keep_apart`, each row records its documents so attention
/// stays inside a document, and the first token of a document inside a row is not a target.
pub fn pack_documents(docs: &[Vec<u32>], block: usize, keep_apart: bool) -> Vec<TrainSequence> {
    let total: usize = docs.iter().map(Vec::len).sum();
    let mut ids = Vec::with_capacity(total);
    let mut doc_of = Vec::with_capacity(total);
    for (d, doc) in docs.iter().enumerate() {
        ids.extend_from_slice(doc);
        doc_of.extend(std::iter::repeat_n(d as u32, doc.len()));
    }
    ids.chunks_exact(block)
        .zip(doc_of.chunks_exact(block))
        .map(|(row, docs)| {
            if keep_apart {
                let learn = (0..block)
                    .map(|i| i > 0 && docs[i] == docs[i - 1])
                    .collect();
                TrainSequence {
                    ids: row.to_vec(),
                    learn,
                    doc_ids: Some(docs.to_vec()),
                }
            } else {
                TrainSequence {
                    ids: row.to_vec(),
                    learn: vec![true; block],
                    doc_ids: None,
                }
            }
        })
        .collect()
}

/// An SFT row: the tokenizer's leading specials (BOS), each segment tokenised without specials and marked
/// learned or not, then EOS (learned). Truncated to `max_len` tokens.
pub fn tokenize_segments(
    tok: &Tokenizer,
    segments: &[Segment],
    max_len: usize,
) -> Result<TrainSequence> {
    let mut ids = Vec::new();
    let mut learn = Vec::new();
    if let (true, Some(bos)) = (tok.adds_bos(), tok.bos_id()) {
        ids.push(bos);
        learn.push(false);
    }
    for s in segments {
        let part = tok.encode(&s.text, false)?;
        learn.extend(std::iter::repeat_n(s.learn, part.len()));
        ids.extend(part);
    }
    let Some(eos) = tok.eos_id() else {
        bail!("the tokenizer has no EOS token; SFT appends one to every response")
    };
    ids.push(eos);
    learn.push(true);
    ids.truncate(max_len);
    learn.truncate(max_len);
    Ok(TrainSequence {
        ids,
        learn,
        doc_ids: None,
    })
}

/// A conversation rendered by a chat template, tokenised whole as transformers' `apply_chat_template`
/// tokenises it (no specials added: the template wrote them), with transformers' assistant-mask rule: for
/// each learned span, the tokens from the one holding its first character to the one holding its last
/// (`char_to_token`: the first token whose offsets contain the character; characters no token holds are
/// passed over). A built-in template's text gets the tokenizer's BOS first and EOS (learned) last, as the
/// Alpaca prompt does. Truncated to `max_len` tokens.
pub fn tokenize_chat(
    tok: &Tokenizer,
    chat: &RenderedChat,
    max_len: usize,
) -> Result<TrainSequence> {
    let (body, offsets) = tok.encode_with_offsets(&chat.text, false)?;
    let mut learn_body = vec![false; body.len()];
    for span in &chat.learned {
        let chars = || {
            chat.text[span.clone()]
                .char_indices()
                .map(|(i, _)| span.start + i)
        };
        let first = chars().find_map(|c| token_holding(&offsets, c));
        let last = chars().rev().find_map(|c| token_holding(&offsets, c));
        if let (Some(a), Some(b)) = (first, last) {
            for l in &mut learn_body[a..=b.max(a)] {
                *l = true;
            }
        }
    }
    let mut ids = Vec::with_capacity(body.len() + 2);
    let mut learn = Vec::with_capacity(body.len() + 2);
    if !chat.writes_specials {
        if let (true, Some(bos)) = (tok.adds_bos(), tok.bos_id()) {
            ids.push(bos);
            learn.push(false);
        }
    }
    ids.extend(body);
    learn.extend(learn_body);
    if !chat.writes_specials {
        let Some(eos) = tok.eos_id() else {
            bail!("the tokenizer has no EOS token; SFT appends one to every response")
        };
        ids.push(eos);
        learn.push(true);
    }
    ids.truncate(max_len);
    learn.truncate(max_len);
    Ok(TrainSequence {
        ids,
        learn,
        doc_ids: None,
    })
}

/// The first token whose byte range holds byte `pos` (token ranges are in text order; neighbours may
/// overlap, as SentencePiece's `▁` pieces do).
fn token_holding(offsets: &[(usize, usize)], pos: usize) -> Option<usize> {
    let from = offsets.partition_point(|&(_, end)| end <= pos);
    offsets[from..]
        .iter()
        .take_while(|&&(start, _)| start <= pos)
        .position(|&(start, end)| start <= pos && pos < end)
        .map(|i| from + i)
}

/// An SFT row from either kind of example text (see [`tokenize_segments`] and [`tokenize_chat`]).
pub fn tokenize_sft(tok: &Tokenizer, text: &SftText, max_len: usize) -> Result<TrainSequence> {
    match text {
        SftText::Segments(segments) => tokenize_segments(tok, segments, max_len),
        SftText::Chat(chat) => tokenize_chat(tok, chat, max_len),
    }
}

/// Packs SFT rows greedily, in order, into rows of at most `max_len` tokens, keeping examples apart
/// (block-diagonal attention, positions restarting per example). No example is split.
pub fn pack_examples(rows: Vec<TrainSequence>, max_len: usize) -> Vec<TrainSequence> {
    let mut out: Vec<TrainSequence> = Vec::new();
    let mut current: Option<TrainSequence> = None;
    let mut doc = 0u32;
    for row in rows {
        let fits = current
            .as_ref()
            .is_some_and(|c| c.ids.len() + row.ids.len() <= max_len);
        if !fits {
            out.extend(current.take());
            current = Some(TrainSequence {
                ids: Vec::new(),
                learn: Vec::new(),
                doc_ids: Some(Vec::new()),
            });
            doc = 0;
        }
        let c = current.as_mut().expect("a row is open");
        let docs = c.doc_ids.as_mut().expect("packed rows have doc ids");
        docs.extend(std::iter::repeat_n(doc, row.ids.len()));
        c.ids.extend(&row.ids);
        // The first token of an example is never a target: it would be predicted across examples.
        c.learn.push(false);
        c.learn.extend(&row.learn[1..]);
        doc += 1;
    }
    out.extend(current);
    out
}

/// The order rows are visited in: epoch after epoch, each a seeded permutation, cut into micro-batches.
/// Micro-batch `k` is a pure function of `k`, so a resumed run sees exactly the data an uninterrupted one would.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    rows: usize,
    micro_batch: usize,
    seed: u64,
    shuffle: bool,
}

impl BatchOrder {
    /// An order over `rows` rows in micro-batches of `micro_batch` (the last of an epoch may be smaller).
    pub fn new(rows: usize, micro_batch: usize, seed: u64, shuffle: bool) -> Self {
        BatchOrder {
            rows,
            micro_batch: micro_batch.max(1),
            seed,
            shuffle,
        }
    }

    /// Micro-batches per epoch.
    pub fn per_epoch(&self) -> usize {
        self.rows.div_ceil(self.micro_batch)
    }

    /// Row indices of global micro-batch `k`.
    pub fn micro_batch(&self, k: usize) -> Vec<usize> {
        let per = self.per_epoch().max(1);
        let (epoch, i) = (k / per, k % per);
        let perm = self.permutation(epoch);
        let lo = i * self.micro_batch;
        perm[lo..(lo + self.micro_batch).min(self.rows)].to_vec()
    }

    /// The row order of `epoch`.
    pub fn permutation(&self, epoch: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..self.rows).collect();
        if self.shuffle {
            let seed = self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        perm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_cuts_blocks_and_marks_boundaries() {
        let docs = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]];
        let rows = pack_documents(&docs, 4, false);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].ids, vec![5, 6, 7, 8]);
        let apart = pack_documents(&docs, 4, true);
        assert_eq!(apart[0].doc_ids.as_deref(), Some(&[0, 0, 0, 1][..]));
        assert_eq!(apart[0].learn, vec![false, true, true, false]);
    }

    #[test]
    fn examples_pack_without_splitting() {
        let row = |n: usize| TrainSequence {
            ids: vec![1; n],
            learn: vec![true; n],
            doc_ids: None,
        };
        let packed = pack_examples(vec![row(3), row(2), row(4)], 5);
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[0].doc_ids.as_deref(), Some(&[0, 0, 0, 1, 1][..]));
        assert_eq!(packed[0].learn, vec![false, true, true, false, true]);
        assert_eq!(packed[1].ids.len(), 4);
    }

    #[test]
    fn batch_order_is_a_function_of_the_index() {
        let order = BatchOrder::new(10, 4, 7, true);
        assert_eq!(order.per_epoch(), 3);
        let epoch0: Vec<usize> = (0..3).flat_map(|k| order.micro_batch(k)).collect();
        let mut sorted = epoch0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(
            order.micro_batch(4),
            BatchOrder::new(10, 4, 7, true).micro_batch(4)
        );
        assert_ne!(order.permutation(0), order.permutation(1));
    }
}
