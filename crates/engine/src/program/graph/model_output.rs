//! What a Hugging Face model's output holds while its loss is taken. `LlamaForCausalLM.forward`
//! (GPT-2's, Qwen2's alike) computes the loss before it returns, so what it returns lives
//! through the loss's forward: the last hidden state (the head's input) and, with `use_cache`
//! (on in training unless gradient checkpointing turns it off), the key/value cache, which
//! keeps every attention layer's keys and values as its kernel reads them (rotated). The
//! caller keeps only the loss: all of it goes before backward.

use super::{Graph, PassThrough, Tensor};
use crate::memory::Part;
use crate::program::Scale;

/// The tensors a model's output holds, and whether it holds a key/value cache.
#[derive(Debug)]
pub(super) struct ModelOutput {
    cache: bool,
    held: Vec<Tensor>,
}

impl Graph {
    /// Hugging Face's step: from now the model's output holds the last hidden state and, with
    /// `cache`, every attention layer's keys and values, until [`Graph::drop_model_output`].
    pub fn begin_model_output(&mut self, cache: bool) {
        self.model_output = Some(ModelOutput {
            cache,
            held: Vec::new(),
        });
    }

    /// `tensor` held by the model's output (in Hugging Face's step).
    pub fn hold_in_output(&mut self, tensor: Tensor) {
        if let Some(output) = &mut self.model_output {
            output.held.push(tensor);
            self.retain(tensor);
        }
    }

    /// An attention layer's keys and values (rotated), as the model's key/value cache takes
    /// them (in Hugging Face's step, with `use_cache`): the cache copies them (`torch.cat` onto
    /// an empty cache), and the attention reads the copies. Where the keys and values are
    /// views of one projection with the queries (`fused`, GPT-2's `c_attn`), which the queries
    /// keep, the copies are kept too: returned, the attention's to read (references the caller
    /// owns). Else the originals go, and are held here as the copies, which the kernels read
    /// (the same bytes), after the moment both exist (copies made and let go, for their bytes).
    pub fn hold_in_cache(
        &mut self,
        keys: Tensor,
        values: Tensor,
        fused: bool,
    ) -> Option<(Tensor, Tensor)> {
        if !self.model_output.as_ref().is_some_and(|o| o.cache) {
            return None;
        }
        if fused {
            let [keys, values] = [keys, values].map(|original| {
                let copy = self.scaled_copy(original, Scale::One);
                self.record(PassThrough, &[original], &[], &[copy]);
                self.hold_in_output(copy);
                copy
            });
            return Some((keys, values));
        }
        let copies: Vec<Option<Tensor>> = [keys, values]
            .into_iter()
            .map(|t| {
                let (len, element) = (self.elements(t), self.tensors[t.0].element);
                self.pytorch_only(Part::Activations, len, element)
            })
            .collect();
        for copy in copies.into_iter().flatten() {
            self.release(copy);
        }
        self.hold_in_output(keys);
        self.hold_in_output(values);
        None
    }

    /// The caller has taken the loss: what the model's output held goes.
    pub fn drop_model_output(&mut self) {
        for tensor in self.model_output.take().map(|o| o.held).unwrap_or_default() {
            self.release(tensor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Graph, Tensor};
    use crate::memory::{Precision, Storage};
    use crate::program::{Framework, Instr, Slot, Tracing};

    /// A graph in PyTorch's step with the keys and values of one attention layer, `cache` as
    /// the model's output says, let go by the layer; the model's output dropped if `dropped`.
    /// Whether their buffers are freed by then.
    fn freed(cache: Option<bool>, dropped: bool) -> bool {
        let mut graph = Graph::new(
            2,
            Precision::F32True,
            0,
            Framework::Pytorch,
            Tracing::Traced,
        );
        if let Some(cache) = cache {
            graph.begin_model_output(cache);
        }
        let [keys, values]: [Tensor; 2] = [8, 8].map(|len| graph.output(len, Storage::F32));
        let slots: Vec<Slot> = [keys, values].map(|t| graph.slot(t)).to_vec();
        graph.hold_in_cache(keys, values, false);
        graph.release(keys);
        graph.release(values);
        if dropped {
            graph.drop_model_output();
        }
        let recorded = graph.finish();
        let code: Vec<Instr> = recorded.setup.into_iter().chain(recorded.step).collect();
        slots.iter().all(|slot| code.contains(&Instr::Free(*slot)))
    }

    #[test]
    fn the_cache_holds_keys_and_values_until_the_output_goes() {
        assert!(!freed(Some(true), false));
        assert!(freed(Some(true), true));
    }

    #[test]
    fn without_a_cache_or_outside_hugging_face_s_step_nothing_is_held() {
        assert!(freed(Some(false), false));
        assert!(freed(None, false));
    }
}
