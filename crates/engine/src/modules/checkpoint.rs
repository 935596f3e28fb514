//! Layers under activation checkpointing, as `torch.utils.checkpoint.checkpoint(layers, x,
//! use_reentrant=False)` runs them: the region's input is kept, its activations are not, and
//! backward runs its forward again when it first needs them
//! ([`crate::program::graph::Graph::begin_checkpoint`] says how the step follows it). The
//! recomputation runs the same kernels on the same input and parameters, and dropout draws the
//! same masks, so gradients are the unchecked layers' own.

use serde::{Deserialize, Serialize};

use super::sequential::delegate_to_body;
use super::{Context, LayerError, LayerSpec, Module, Parameter, Parameters, Path, Sequential};
use super::{Token, Values};
use crate::program::graph::{Graph, Recompute, Tensor};

/// The checkpointed layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// The layers, applied in order, whose activations are recomputed in backward.
    pub layers: Vec<LayerSpec>,
}

impl CheckpointSpec {
    /// The checkpointed layers over a sample of `input` shape.
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Checkpoint, LayerError> {
        let field = at.field("layers");
        if cx.checkpointed {
            return Err(LayerError::new(
                field,
                "checkpointed regions do not nest: this one is inside another; checkpoint \
                 either the outer region or the inner ones",
            ));
        }
        cx.depth += 1;
        cx.checkpointed = true;
        // The checkpoint's frame saves the region's input for the recomputation: no layer
        // inside may change it in place.
        cx.input_kept = true;
        let body = Sequential::build(&self.layers, input, &at.list("layers"), cx);
        cx.checkpointed = false;
        cx.depth -= 1;
        Ok(Checkpoint { body: body?, field })
    }
}

/// Layers whose activations are recomputed in backward.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    body: Sequential,
    /// Its place in the job (`model.layers[3].checkpoint.layers`).
    field: String,
}

/// A region's forward as its recomputation runs it: its layers over the parameters they took.
#[derive(Debug)]
struct Replay {
    body: Sequential,
    parameters: Vec<Tensor>,
    first: usize,
}

impl Recompute for Replay {
    fn recompute(&self, graph: &mut Graph, input: Tensor) -> Tensor {
        let mut parameters = Parameters::resumed(&self.parameters, self.first);
        self.body.forward(graph, input, &mut parameters)
    }
}

impl Module for Checkpoint {
    delegate_to_body!();

    fn parameters(&self) -> Vec<Parameter> {
        self.body.parameters()
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let (tensors, first) = parameters.mark();
        let region = graph.begin_checkpoint(x, &self.field);
        let y = self.body.forward(graph, x, parameters);
        let replay = Replay {
            body: self.body.clone(),
            parameters: tensors,
            first,
        };
        graph.end_checkpoint(region, replay);
        y
    }

    fn token(&self) -> Token {
        match self.body.token() {
            Token::Layer(word) => Token::Layer(format!("ckpt({word})")),
            other => other,
        }
    }

    fn keeps_output(&self, _: bool) -> bool {
        self.body.keeps_output(true)
    }
}

/// Where a job asks for checkpointing as Hugging Face's `gradient_checkpointing_enable()` does.
pub const GRADIENT_CHECKPOINTING: &str = "model.gradient_checkpointing";

/// Whether a job's `model` object asks for [`GRADIENT_CHECKPOINTING`].
pub fn asked(model: &serde_json::Map<String, serde_json::Value>) -> bool {
    model.get("gradient_checkpointing") == Some(&serde_json::Value::Bool(true))
}

/// `layers` (a job's `model.layers`) with every run of `per_region` top-level residual blocks
/// under one `checkpoint`: `gradient_checkpointing_enable()`'s regions, a decoder layer of a
/// Hugging Face model (two blocks) or each block of a layer list (one). A list checkpointed
/// already is left as it is (a job headroom wrote, sent again); a list with no residual block
/// is refused.
pub fn checkpoint_blocks(
    layers: Vec<serde_json::Value>,
    per_region: usize,
) -> Result<Vec<serde_json::Value>, LayerError> {
    let is = |layer: &serde_json::Value, kind: &str| layer.get(kind).is_some();
    if !layers.iter().any(|l| is(l, "residual")) {
        return match layers.iter().any(|l| is(l, "checkpoint")) {
            true => Ok(layers),
            false => Err(LayerError::new(
                GRADIENT_CHECKPOINTING,
                "the model has no residual blocks to checkpoint: put the layers to recompute in \
                 a {\"checkpoint\": {\"layers\": [...]}} layer instead",
            )),
        };
    }
    let mut checkpointed = Vec::with_capacity(layers.len());
    let mut run: Vec<serde_json::Value> = Vec::new();
    for layer in layers {
        if is(&layer, "residual") {
            run.push(layer);
            if run.len() == per_region {
                checkpointed.push(region(std::mem::take(&mut run)));
            }
            continue;
        }
        if !run.is_empty() {
            checkpointed.push(region(std::mem::take(&mut run)));
        }
        checkpointed.push(layer);
    }
    if !run.is_empty() {
        checkpointed.push(region(run));
    }
    Ok(checkpointed)
}

/// `layers` as one checkpointed region.
fn region(layers: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({"checkpoint": {"layers": layers}})
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::Job;

    /// A job over 16 features: `layers`, then the head over 10 classes, with `extra` fields on
    /// the job.
    fn job(layers: Value, extra: Value) -> Result<Job, crate::JobError> {
        let mut job = json!({
            "model": {"input_shape": [16], "num_classes": 10, "layers": layers},
            "optimizer": {"name": "adam"}
        });
        for (key, value) in extra.as_object().unwrap() {
            job[key] = value.clone();
        }
        Job::from_value(job)
    }

    fn block() -> Value {
        json!({"residual": {"layers": [
            {"layer_norm": {}}, {"linear": {"out_features": 64}}, {"gelu": {}},
            {"linear": {"out_features": 16}}, {"dropout": {"p": 0.1}}
        ]}})
    }

    fn peak(job: &Job, batch: u64) -> u64 {
        job.plan().memory(batch).unwrap().total
    }

    #[test]
    fn decoder_layers_are_checkpointed_in_pairs_and_a_checkpointed_list_stays_as_it_is() {
        let list = vec![
            json!({"embedding": {}}),
            block(),
            block(),
            block(),
            json!({"norm": {}}),
        ];
        let paired = checkpoint_blocks(list.clone(), 2).unwrap();
        assert_eq!(paired.len(), 4);
        assert_eq!(
            paired[1],
            json!({"checkpoint": {"layers": [block(), block()]}})
        );
        assert_eq!(paired[2], json!({"checkpoint": {"layers": [block()]}}));
        assert_eq!(checkpoint_blocks(paired.clone(), 2).unwrap(), paired);
        let single = checkpoint_blocks(list, 1).unwrap();
        assert_eq!(single.len(), 5);
    }

    /// A Hugging Face config's decoder layers (two blocks each) are its regions, and the job
    /// written back, checkpoints and all, reads as the same job.
    #[test]
    fn a_configs_decoder_layers_are_checkpointed_and_the_answer_reads_back() {
        let config = json!({"model_type": "gpt2", "n_layer": 3, "n_embd": 32, "n_head": 4,
            "vocab_size": 100, "n_positions": 64});
        let spec = json!({"model": {"huggingface": config, "tokens": {"sequence_length": 16},
            "gradient_checkpointing": true}, "optimizer": {"name": "adamw"}});
        let job = Job::from_value(spec).unwrap();
        let layers = serde_json::to_value(job.plan().layers()).unwrap();
        let regions: Vec<&Value> = layers
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l.pointer("/checkpoint/layers"))
            .collect();
        assert_eq!(regions.len(), 3, "{layers}");
        for region in regions {
            let blocks = region.as_array().unwrap();
            assert!(blocks.len() == 2 && blocks.iter().all(|b| b.get("residual").is_some()));
        }
        let again = Job::from_value(serde_json::to_value(job.spec()).unwrap()).unwrap();
        assert_eq!(again.spec(), job.spec());
    }

    #[test]
    fn a_model_without_blocks_is_refused_by_the_field_that_asked() {
        let flat = json!([{"linear": {"out_features": 8}}, {"relu": {}},
            {"linear": {"out_features": 10}}]);
        let shorthand = json!({"model": {"input_shape": [16], "num_classes": 10,
            "hidden_layers": [8], "gradient_checkpointing": true}, "optimizer": {"name": "adam"}});
        let listed = json!({"model": {"input_shape": [16], "num_classes": 10, "layers": flat,
            "gradient_checkpointing": true}, "optimizer": {"name": "adam"}});
        for spec in [shorthand, listed] {
            let error = Job::from_value(spec).unwrap_err();
            assert_eq!(error.field, GRADIENT_CHECKPOINTING, "{error}");
        }
    }

    #[test]
    fn checkpoints_do_not_nest_and_need_pytorchs_step() {
        let nested = json!([{"checkpoint": {"layers": [{"checkpoint": {"layers": [block()]}}]}},
            {"linear": {"out_features": 10}}]);
        let error = job(nested, json!({})).unwrap_err();
        assert_eq!(
            error.field,
            "model.layers[0].checkpoint.layers[0].checkpoint.layers"
        );
        let list = json!([{"checkpoint": {"layers": [block()]}}, {"linear": {"out_features": 10}}]);
        let error = job(list, json!({"framework": "headroom"})).unwrap_err();
        assert_eq!(error.field, "model.layers[0].checkpoint.layers", "{error}");
        assert!(error.reason.contains("\"pytorch\""), "{error}");
    }

    /// Checkpointing every block of a deep stack trades each block's saved activations for its
    /// input: fewer bytes wherever activations make the peak (at one sample the optimizer's
    /// update does, the same in both), the parameters the same.
    #[test]
    fn checkpointing_every_block_keeps_less_at_every_batch() {
        let layers: Vec<Value> = std::iter::repeat_n(block(), 6)
            .chain([json!({"linear": {"out_features": 10}})])
            .collect();
        let plain = job(Value::Array(layers.clone()), json!({})).unwrap();
        let mut spec = json!({
            "model": {"input_shape": [16], "num_classes": 10, "layers": layers,
                "gradient_checkpointing": true},
            "optimizer": {"name": "adam"}
        });
        let checkpointed = Job::from_value(spec.take()).unwrap();
        assert_eq!(
            plain.plan().parameter_count(),
            checkpointed.plan().parameter_count()
        );
        assert_eq!(peak(&plain, 1), peak(&checkpointed, 1));
        for batch in [64, 4096] {
            let (kept, recomputed) = (peak(&plain, batch), peak(&checkpointed, batch));
            assert!(recomputed < kept, "batch {batch}: {recomputed} vs {kept}");
        }
        let per_sample = |job: &Job| peak(job, 4096) - peak(job, 2048);
        assert!(2 * per_sample(&checkpointed) < per_sample(&plain));
    }
}
