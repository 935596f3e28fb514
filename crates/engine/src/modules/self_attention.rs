//! Multi-head self-attention over a `[positions, features]` sample, as Llama's and GPT-2's
//! attention blocks compute it with `F.scaled_dot_product_attention`: the query, key and value
//! projections (Hugging Face's `q_proj`, `k_proj`, `v_proj`, each a [`Linear`] module), the
//! heads viewed out of them (`view` and `transpose`: no copy), the fused attention, its output's
//! heads merged back (a view: the fused kernel writes `[batch, positions, heads, head_dim]`) and
//! the output projection (`o_proj`). Grouped-query attention shares each key/value head among
//! `num_heads / num_kv_heads` query heads (SDPA's `enable_gqa`: the keys are not repeated).
//!
//! The fused path (attention.cu, FlashAttention-2's algorithm) keeps no `positions x positions`
//! matrix: it writes the output and a float32 log-sum-exp per query row, and saves the queries,
//! keys, values, output and log-sum-exp; its backward writes the three gradients at once, the
//! scores recomputed tile by tile. Under autocast it runs in half, as the projections write.
//!
//! With `dropout`, the fused kernels drop probabilities as FlashAttention-2 does, keeping no
//! mask: each step's mask is redrawn from headroom's stream where it is used (forward and
//! backward), so dropout adds no memory (CUDA's fused kernels keep only the Philox seed and
//! offset, two host scalars).
//!
//! With `implementation: eager` the attention is Hugging Face's eager path instead
//! ([`super::eager_attention`]): the `positions x positions` scores, their f32 softmax and its
//! half copy materialized, as `attn_implementation="eager"` trains.
//!
//! With `fused_qkv` the query, key and value come from one projection split in three (GPT-2's
//! `c_attn`): autocast casts the input once, the three are views of one tensor (alive while any
//! is), and a key/value cache copies the keys and values beside them, the copies what the
//! attention reads. With `upcast_softmax: false` the eager path's softmax is GPT-2's, in the
//! scores' type.
//!
//! With `rope_theta`, rotary position embedding ([`super::rotary`]) turns the queries and keys
//! before the attention, as Llama's block does; under autocast the f32 tables make them f32,
//! which SDPA's autocast casts back to half (and those f32 values stay until the block ends).

use serde::{Deserialize, Serialize};

use super::check::{extent, show};
use super::eager_attention;
use super::linear::{Linear, LinearSpec};
use super::rotary;
use super::{Context, LayerError, Module, Parameter, Parameters, Path, Token, Values, MAX_EXTENT};
use crate::memory::Storage;
use crate::program::geometry::{Attention, AttentionDropout, Rotary};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{AttentionGradients, AttentionSaved, Instr};
use crate::synthetic;

/// The widest head attention.cu's kernels take (`ATTENTION_MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: u64 = 256;

/// Self-attention's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfAttentionSpec {
    /// Query heads (`num_attention_heads`).
    pub num_heads: u64,
    /// Key/value heads (`num_key_value_heads`): `num_heads` unless given (multi-head
    /// attention); fewer for grouped-query attention, 1 for multi-query.
    #[serde(default)]
    pub num_kv_heads: Option<u64>,
    /// Values of a head: the features over `num_heads` unless given.
    #[serde(default)]
    pub head_dim: Option<u64>,
    /// Whether a position attends only to itself and those before it (SDPA's `is_causal`;
    /// false, its default: a decoder sets it).
    #[serde(default)]
    pub causal: bool,
    /// Whether the four projections learn a bias (true, as GPT-2's; Llama's have none).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Whether the output projection (`o_proj`) learns one: `bias` unless given (Qwen2's
    /// query, key and value projections learn a bias, its output projection none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bias: Option<bool>,
    /// Rotary position embedding's base (`rope_theta`: 10,000 in Llama 2, 500,000 in Llama
    /// 3); none, no rotary embedding.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Dropout on the attention probabilities while training (SDPA's `dropout_p`, Hugging
    /// Face's `attention_dropout` / GPT-2's `attn_pdrop`), in [0, 1).
    #[serde(default)]
    pub dropout: f64,
    /// How the attention is computed (Hugging Face's `attn_implementation`): `sdpa`, the fused
    /// kernels (the default), or `eager`, the scores materialized.
    #[serde(default)]
    pub implementation: Implementation,
    /// Whether the query, key and value come from one linear layer, split (GPT-2's `c_attn`):
    /// autocast casts the input once, and the three are views of one tensor, alive while any
    /// of them is (false: three layers, Llama's `q_proj`, `k_proj` and `v_proj`).
    #[serde(default)]
    pub fused_qkv: bool,
    /// The eager path's softmax: in f32, cast back (`softmax(w, dtype=torch.float32)`, Llama's:
    /// true, the default), or in the scores' type (`softmax(w)`, GPT-2's: false). Under CUDA's
    /// autocast both run in f32.
    #[serde(default = "yes")]
    pub upcast_softmax: bool,
}

/// How self-attention computes its scores, in Hugging Face's `attn_implementation` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Implementation {
    /// `F.scaled_dot_product_attention`'s fused path: no `positions x positions` buffer.
    #[default]
    Sdpa,
    /// `eager_attention_forward`: the scores, their f32 softmax and its half copy materialized
    /// ([`super::eager_attention`]).
    Eager,
}

fn yes() -> bool {
    true
}

impl SelfAttentionSpec {
    /// The block over a sample of `input` shape, `[positions, features]`.
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<SelfAttention, LayerError> {
        let [sequence, features] = *input else {
            return Err(at.error(format!(
                "self_attention needs a [positions, features] sample (a sequence), and {} \
                 reaches it",
                show(input)
            )));
        };
        let heads = extent(at, "num_heads", self.num_heads, 1)?;
        let kv_heads = extent(at, "num_kv_heads", self.num_kv_heads.unwrap_or(heads), 1)?;
        if heads % kv_heads != 0 {
            return Err(at.error_at(
                "num_kv_heads",
                format!(
                    "each key/value head serves the same number of query heads: {kv_heads} \
                     does not divide num_heads ({heads})"
                ),
            ));
        }
        if self.implementation == Implementation::Eager && kv_heads == 1 && heads > 1 {
            return Err(at.error_at(
                "implementation",
                "eager attention with one key/value head for several query heads (multi-query) \
                 is not modelled exactly yet: PyTorch's repeat_kv of one head is a view, copied \
                 inside the products, and headroom does not follow those copies in every case; \
                 use \"sdpa\", or num_kv_heads above 1",
            ));
        }
        let head_dim = match self.head_dim {
            Some(dim) => dim,
            None if features % heads == 0 => features / heads,
            None => {
                return Err(at.error_at(
                    "num_heads",
                    format!(
                        "the heads split the features: {heads} does not divide {features}; \
                         give head_dim to project to another width"
                    ),
                ))
            }
        };
        if !(1..=MAX_HEAD_DIM).contains(&head_dim) {
            return Err(at.error_at(
                "head_dim",
                format!("must be between 1 and {MAX_HEAD_DIM}, got {head_dim}"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(at.error_at(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        let dropout = (self.dropout > 0.0).then(|| {
            cx.dropouts += 1;
            (self.dropout as f32, cx.dropouts - 1)
        });
        let adapted = cx.lora.as_ref().is_some_and(|lora| {
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .any(|n| lora.targets(n))
        });
        // A projection, with a LoRA adapter when the job's targets name it.
        let mut linear = |name: &str, out_features: u64, bias: bool, input: &[u64]| {
            LinearSpec {
                out_features,
                bias,
                tied: false,
            }
            .build(input, at, cx)?
            .adapted(name, input, at, cx)
        };
        let width = |n: u64| {
            n.checked_mul(head_dim)
                .filter(|&w| w <= MAX_EXTENT)
                .ok_or_else(|| {
                    at.error_at(
                        "num_heads",
                        format!("{n} heads of {head_dim} values are wider than {MAX_EXTENT}"),
                    )
                })
        };
        let rope_theta = match self.rope_theta {
            None => None,
            Some(theta) if !(theta.is_finite() && theta > 1.0 && theta <= f64::from(f32::MAX)) => {
                return Err(at.error_at(
                    "rope_theta",
                    format!("must be a finite number above 1, got {theta}"),
                ))
            }
            Some(_) if head_dim % 2 != 0 => {
                return Err(at.error_at(
                    "rope_theta",
                    format!(
                        "rotary embedding turns a head's features in pairs, one from each \
                         half: head_dim must be even, got {head_dim}"
                    ),
                ))
            }
            Some(theta) => Some(theta as f32),
        };
        let refusal = match (self.fused_qkv, rope_theta, adapted) {
            (false, ..) => None,
            (true, Some(_), _) => Some((
                "rope_theta",
                "rotary embedding on a fused query/key/value projection (fused_qkv) is not \
                 modelled: which of the split views outlive the rotation is not followed",
            )),
            (true, None, true) => Some((
                "fused_qkv",
                "LoRA on the query, key or value of a fused projection (GPT-2's c_attn) is not \
                 modelled: peft adapts the projection as one, an adapter for all three; target \
                 other layers, or use three projections (fused_qkv false)",
            )),
            (true, None, false) => None,
        };
        if let Some((field, reason)) = refusal {
            return Err(at.error_at(field, reason));
        }
        let q = linear("q_proj", width(heads)?, self.bias, input)?;
        let k = linear("k_proj", width(kv_heads)?, self.bias, input)?;
        let v = linear("v_proj", width(kv_heads)?, self.bias, input)?;
        let output_bias = self.output_bias.unwrap_or(self.bias);
        let heads_out = q.output_shape().to_vec();
        let o = linear("o_proj", features, output_bias, &heads_out)?;
        Ok(SelfAttention {
            q,
            k,
            v,
            o,
            sequence,
            heads,
            kv_heads,
            head_dim,
            causal: self.causal,
            rope_theta,
            dropout,
            eager: self.implementation == Implementation::Eager,
            fused_qkv: self.fused_qkv,
            upcast_softmax: self.upcast_softmax,
        })
    }
}

/// A self-attention block.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    sequence: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    causal: bool,
    rope_theta: Option<f32>,
    /// Dropout's probability and which dropout of the model it is (its masks' stream).
    dropout: Option<(f32, usize)>,
    /// Whether the scores are materialized (the eager path) rather than fused.
    eager: bool,
    /// Whether the query, key and value are one projection's, split.
    fused_qkv: bool,
    /// Whether the eager path's softmax runs in f32.
    upcast_softmax: bool,
}

impl SelfAttention {
    /// Rotary embedding over `heads` heads of a batch of `batch` sequences, if any.
    fn rotary(&self, batch: u64, heads: u64) -> Option<Rotary> {
        self.rope_theta.map(|theta| Rotary {
            batch,
            sequence: self.sequence,
            heads,
            head_dim: self.head_dim,
            theta,
        })
    }

    /// The attention over `batch` sequences, its dropout keyed by `key` (the executor draws
    /// step `s`'s masks from [`synthetic::stream_key`]`(key, s)`).
    fn shape(&self, batch: u64, seed: u64) -> Attention {
        Attention {
            batch,
            sequence: self.sequence,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: self.causal,
            dropout: self.dropout.map(|(p, stream)| AttentionDropout {
                p,
                key: synthetic::stream_key(seed, synthetic::dropout_stream(stream)),
            }),
        }
    }
}

impl Module for SelfAttention {
    fn output_shape(&self) -> &[u64] {
        self.o.output_shape()
    }

    fn parameters(&self) -> Vec<Parameter> {
        [&self.q, &self.k, &self.v, &self.o]
            .into_iter()
            .flat_map(|linear| linear.parameters())
            .collect()
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let rows = graph.rows();
        let rotary = self
            .rotary(rows, self.heads)
            .zip(self.rotary(rows, self.kv_heads));
        // One projection split in three reads one input: under autocast, one cast.
        let source = match self.fused_qkv {
            true => graph.operand(x),
            false => {
                graph.retain(x);
                x
            }
        };
        // The heads are views whose gradient may arrive in another layout (a copy in
        // backward): after rotary embedding, and on the eager path where its layouts say.
        let heads =
            |graph: &mut Graph, linear: &Linear, parameters: &mut Parameters<'_>, copies| {
                let y = linear.forward(graph, source, parameters);
                let Some(copies) = copies else {
                    return y;
                };
                let view = rotary::heads_view(graph, y, copies);
                graph.release(y);
                view
            };
        let shape = self.shape(rows, graph.seed());
        let [q_copies, k_copies, v_copies] = match self.eager {
            true => eager_attention::view_copies(&shape).map(Some),
            false => [rotary.map(|_| true), rotary.map(|_| true), None],
        };
        let q = heads(graph, &self.q, parameters, q_copies);
        let k = heads(graph, &self.k, parameters, k_copies);
        let v = heads(graph, &self.v, parameters, v_copies);
        graph.release(source);
        if self.fused_qkv {
            // Views of one tensor: its storage lives while the queries' does.
            graph.keep_alive_with(q, k);
            graph.keep_alive_with(q, v);
        }
        let (q, k) = match rotary {
            Some((for_q, for_k)) => {
                let tables = rotary::tables(graph, &for_q);
                let embedded = (
                    rotary::embed(graph, q, &tables, for_q),
                    rotary::embed(graph, k, &tables, for_k),
                );
                graph.release(q);
                graph.release(k);
                embedded
            }
            None => (q, k),
        };
        // The attention reads the cache's copies where they are kept beside the originals.
        let cached = graph.hold_in_cache(k, v, self.fused_qkv);
        let (keys, values) = cached.unwrap_or((k, v));
        let o = match self.eager {
            true => {
                let reads = (cached.is_some(), self.upcast_softmax);
                eager_attention::attention(graph, [q, keys, values], shape, reads)
            }
            false => {
                // SDPA's autocast casts what is not half (rotary's f32 queries and keys).
                let operands = [q, keys, values].map(|t| graph.operand(t));
                let o = attention(graph, operands, shape);
                for tensor in operands {
                    graph.release(tensor);
                }
                o
            }
        };
        let y = self.o.forward(graph, o, parameters);
        graph.release(o);
        for tensor in [q, k, v] {
            graph.release(tensor);
        }
        if let Some((keys, values)) = cached {
            graph.release(keys);
            graph.release(values);
        }
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64> {
        let mut q = self.q.reference(x, rows, values, seed);
        let mut k = self.k.reference(x, rows, values, seed);
        let v = self.v.reference(x, rows, values, seed);
        if let Some((for_q, for_k)) = self
            .rotary(rows as u64, self.heads)
            .zip(self.rotary(rows as u64, self.kv_heads))
        {
            q = rotary::reference(&q, &for_q);
            k = rotary::reference(&k, &for_k);
        }
        // Step 0's masks, as the executor draws them in the first step.
        let shape = self.shape(rows as u64, seed).at_step(0);
        let o = reference_attention(&q, &k, &v, &shape);
        self.o.reference(&o, rows, values, seed)
    }

    fn multiply_adds(&self) -> u64 {
        let projections = [&self.q, &self.k, &self.v, &self.o]
            .iter()
            .map(|linear| linear.multiply_adds())
            .sum::<u64>();
        // The eager path multiplies every pair, the mask applied after.
        let pairs = match self.causal && !self.eager {
            true => self.sequence * (self.sequence + 1) / 2,
            false => self.sequence * self.sequence,
        };
        // Scores and the weighted sum: two products of a head's width for every pair.
        projections + 2 * pairs * self.heads * self.head_dim
    }

    fn token(&self) -> Token {
        let kv = match self.kv_heads == self.heads {
            true => String::new(),
            false => format!("/{}", self.kv_heads),
        };
        let causal = if self.causal { "causal" } else { "" };
        let rope = match self.rope_theta {
            Some(theta) => format!("rope{theta}"),
            None => String::new(),
        };
        let dropout = match self.dropout {
            Some((p, _)) => format!("d{p}"),
            None => String::new(),
        };
        let eager = if self.eager { "eager" } else { "" };
        Token::Layer(format!(
            "{eager}{causal}{rope}attn{}{kv}x{}{dropout}",
            self.heads, self.head_dim
        ))
    }
}

/// The fused attention of `[q, k, v]` (references the caller keeps), recorded with its backward;
/// its output, a reference the caller owns.
fn attention(graph: &mut Graph, [q, k, v]: [Tensor; 3], shape: Attention) -> Tensor {
    let o = graph.output(graph.elements(q), graph.storage(q));
    let rows = graph.times_rows(shape.sequence.saturating_mul(shape.heads));
    let lse = graph.output(rows, Storage::F32);
    graph.emit(Instr::AttentionForward {
        q: graph.slot(q),
        k: graph.slot(k),
        v: graph.slot(v),
        o: graph.slot(o),
        lse: graph.slot(lse),
        shape,
    });
    let saved = AttentionSaved { q, k, v, o, lse };
    graph.record(
        AttentionBackward { saved, shape },
        &[q, k, v],
        &[q, k, v, o, lse],
        &[o],
    );
    graph.release(lse);
    o
}

/// The fused attention's backward: the queries', keys' and values' gradients at once.
#[derive(Debug)]
struct AttentionBackward {
    saved: AttentionSaved<Tensor>,
    shape: Attention,
}

impl Backward for AttentionBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dout) = grads[0] else {
            return vec![None; 3];
        };
        let storage = pass.storage(dout);
        let (queries, keys) = (self.shape.query_values(), self.shape.key_values());
        let dq = pass.gradient(0, queries, storage);
        let dk = pass.gradient(1, keys, storage);
        let dv = pass.gradient(2, keys, storage);
        let workspaces = flash_backward_workspaces(&self.shape, storage)
            .into_iter()
            .filter_map(|(elements, storage)| pass.cuda_workspace(elements, storage))
            .collect::<Vec<_>>();
        let s = self.saved;
        pass.emit(Instr::AttentionBackward {
            saved: AttentionSaved {
                q: pass.slot(s.q),
                k: pass.slot(s.k),
                v: pass.slot(s.v),
                o: pass.slot(s.o),
                lse: pass.slot(s.lse),
            },
            dout: pass.slot(dout),
            grads: AttentionGradients {
                dq: pass.slot(dq),
                dk: pass.slot(dk),
                dv: pass.slot(dv),
            },
            shape: self.shape,
        });
        for workspace in workspaces {
            pass.release(workspace);
        }
        pass.where_needed([dq, dk, dv])
    }
}

/// What CUDA's FlashAttention-2 backward (`mha_bwd` in PyTorch's vendored `flash_api.cpp`, the
/// kernel SDPA takes for 16-bit values) allocates beside the three gradients while it runs, as
/// (elements, storage): `softmax_d`, f32 per query row, the positions rounded up to 128;
/// `dq_accum`, the queries' gradient in f32 over those rounded positions and the head width
/// rounded up to 32 (256 past 192); and under grouped-query attention `dk_expanded` and
/// `dv_expanded`, the keys' and values' gradients for every query head before they are summed
/// per key/value head. None in f32 (SDPA takes the memory-efficient kernel there). Unmeasured
/// on a GPU: docs/gpu-runs.md lists them for the first run to confirm.
fn flash_backward_workspaces(shape: &Attention, storage: Storage) -> Vec<(u64, Storage)> {
    if storage == Storage::F32 {
        return Vec::new();
    }
    let rounded = |n: u64, to: u64| n.div_ceil(to).saturating_mul(to);
    let positions = rounded(shape.sequence, 128);
    let width = match shape.head_dim {
        d if d <= 192 => rounded(d, 32),
        _ => 256,
    };
    let rows = shape
        .batch
        .saturating_mul(shape.heads)
        .saturating_mul(positions);
    let mut workspaces = vec![
        (rows, Storage::F32),
        (rows.saturating_mul(width), Storage::F32),
    ];
    if shape.kv_heads != shape.heads {
        let expanded = shape.query_values();
        workspaces.extend([(expanded, storage), (expanded, storage)]);
    }
    workspaces
}

/// Attention from its definition in f64, the scores materialized: `softmax(q k^T / sqrt(d)) v`
/// per sample and head (each probability times its dropout factor, if any), over `[batch, sequence, heads, head_dim]` queries and `[batch,
/// sequence, kv_heads, head_dim]` keys and values.
pub fn reference_attention(q: &[f64], k: &[f64], v: &[f64], shape: &Attention) -> Vec<f64> {
    let [b, t, h, kvh, d] = [
        shape.batch,
        shape.sequence,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
    ]
    .map(|n| n as usize);
    let scale = 1.0 / (d as f64).sqrt();
    let q_row = |s: usize, i: usize, head: usize| &q[((s * t + i) * h + head) * d..][..d];
    let kv_row = |s: usize, j: usize, g: usize| ((s * t + j) * kvh + g) * d;
    let mut o = vec![0.0; b * t * h * d];
    for s in 0..b {
        for head in 0..h {
            let g = head / (h / kvh);
            for i in 0..t {
                let keys = if shape.causal { i + 1 } else { t };
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let at = kv_row(s, j, g);
                        let dot: f64 = (0..d).map(|c| q_row(s, i, head)[c] * k[at + c]).sum();
                        dot * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let out = &mut o[((s * t + i) * h + head) * d..][..d];
                for (j, w) in weights.iter().enumerate() {
                    let at = kv_row(s, j, g);
                    let kept = match shape.dropout {
                        Some(dropout) => {
                            let at = [s, head, i, j].map(|n| n as u64);
                            f64::from(dropout.factor(shape, at))
                        }
                        None => 1.0,
                    };
                    for c in 0..d {
                        out[c] += w / total * kept * v[at + c];
                    }
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_attention_s_backward_buffers_round_as_mha_bwd_does() {
        let shape = Attention {
            batch: 3,
            sequence: 130,
            heads: 4,
            kv_heads: 2,
            head_dim: 40,
            causal: false,
            dropout: None,
        };
        // Positions rounded up to 128 (256), head width to 32 (64), for 3 x 4 heads; the keys'
        // and values' gradients for all 4 heads under grouped-query attention.
        let (rows, expanded) = (3 * 4 * 256, 3 * 130 * 4 * 40);
        assert_eq!(
            flash_backward_workspaces(&shape, Storage::Bf16),
            [
                (rows, Storage::F32),
                (rows * 64, Storage::F32),
                (expanded, Storage::Bf16),
                (expanded, Storage::Bf16)
            ]
        );
        let wide = Attention {
            head_dim: 200,
            kv_heads: 4,
            ..shape
        };
        assert_eq!(
            flash_backward_workspaces(&wide, Storage::F16),
            [(rows, Storage::F32), (rows * 256, Storage::F32)]
        );
        assert!(flash_backward_workspaces(&shape, Storage::F32).is_empty());
    }
}
