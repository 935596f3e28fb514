//! The loss: `F.cross_entropy(logits, labels)` as PyTorch computes it, `nll_loss` of
//! `log_softmax` (loss.cu's fused kernel writes the per-sample losses and the logits' gradient
//! at once). In the mixed precisions the logits are made f32 first (autocast runs the loss in
//! f32), and their gradient is made half again in backward, times the loss scale under `16-mixed`.
//!
//! Its memory is PyTorch's: `log_softmax` writes the log-probabilities and saves them; backward
//! allocates `nll_loss`'s dense gradient (held for its bytes: the fused kernel already wrote the
//! gradient), then `log_softmax`'s, which lets both go.
//!
//! Hugging Face's `ForCausalLMLoss` (a language model's own step) makes the logits f32 in every
//! precision (`logits.float()`), pads the labels with one ignored position and takes a shifted
//! copy of them (`nll_loss` saves it until its backward), then the same `cross_entropy`. The
//! labels' copies are held for their bytes: the synthetic labels are drawn per position.

use crate::memory::{Element, Part, Storage};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Instr, Scale, Slot};

/// Records the loss of `logits` (`rows` x `classes`: one row a sample, or a token) against
/// `labels`, the per-row losses into `row_loss`, as `F.cross_entropy` or (`hugging_face`)
/// `ForCausalLMLoss` takes it; returns the node backward starts from (none when nothing is
/// trained).
pub fn record(
    graph: &mut Graph,
    logits: Tensor,
    (labels, row_loss): (Slot, Slot),
    (rows, classes): (u64, u64),
    hugging_face: bool,
) -> Option<usize> {
    let half = graph.storage(logits) != Storage::F32;
    let widened = (graph.precision().is_mixed() || (hugging_face && half))
        .then(|| graph.cast(logits, Storage::F32, Scale::Loss));
    let source = widened.unwrap_or(logits);
    // ForCausalLMLoss's labels: padded by a position a sample, then the shifted copy.
    let (padded, shifted) = match hugging_face {
        true => {
            let padded_len = rows.saturating_add(graph.rows());
            let mut copy = |len| graph.pytorch_only(Part::Activations, len, Element::Index);
            (copy(padded_len), copy(rows))
        }
        false => (None, None),
    };
    let len = graph.elements(source);
    let log_probs = graph.output(len, graph.storage(source));
    graph.emit(Instr::Convert {
        from: graph.slot(source),
        to: graph.slot(log_probs),
        len,
        scale: Scale::One,
    });
    graph.emit(Instr::SoftmaxCrossEntropy {
        logits: graph.slot(log_probs),
        labels,
        row_loss,
        rows,
        classes,
    });
    graph.record(
        LogSoftmaxBackward { log_probs },
        &[source],
        &[log_probs],
        &[log_probs],
    );
    let saved: Vec<Tensor> = std::iter::once(log_probs).chain(shifted).collect();
    let root = graph.record(NllBackward { log_probs }, &[log_probs], &saved, &[]);
    graph.release(log_probs);
    graph.release_optional(shifted);
    graph.release_optional(widened);
    graph.release_optional(padded);
    root
}

/// `nll_loss`'s backward: its dense gradient of the log-probabilities.
#[derive(Debug)]
struct NllBackward {
    log_probs: Tensor,
}

impl Backward for NllBackward {
    fn backward(&self, pass: &mut Pass<'_>, _: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (len, storage) = (pass.elements(self.log_probs), pass.storage(self.log_probs));
        // PyTorch's one-hot gradient, never written: the fused kernel wrote the logits' gradient
        // into the log-probabilities, which headroom's own step hands on instead.
        let gradient = pass
            .pytorch_only(len, storage)
            .unwrap_or_else(|| pass.pass_through(self.log_probs));
        vec![Some(gradient)]
    }
}

/// `log_softmax`'s backward: the logits' gradient (already computed into the
/// log-probabilities by the fused kernel, copied into the buffer PyTorch allocates for it).
#[derive(Debug)]
struct LogSoftmaxBackward {
    log_probs: Tensor,
}

impl Backward for LogSoftmaxBackward {
    fn backward(&self, pass: &mut Pass<'_>, _: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        if !pass.needs(0) {
            return vec![None];
        }
        let len = pass.elements(self.log_probs);
        let gradient = pass.gradient(0, len, pass.storage(self.log_probs));
        pass.emit(Instr::Convert {
            from: pass.slot(self.log_probs),
            to: pass.slot(gradient),
            len,
            scale: Scale::One,
        });
        vec![Some(gradient)]
    }
}
