//! A ViT's patch embedding, as torchvision's `VisionTransformer` and Hugging Face's
//! `ViTEmbeddings` make it: a convolution whose kernel and stride are the patch
//! (`conv_proj`), its `[embedding_dim, patches]` output read as `[patches, embedding_dim]`
//! tokens, a learnt class token before them (`torch.cat`), and a learnt position embedding
//! added to every token. The convolution is the [`Conv2d`] module; the tokens are
//! embedding.cu's `patch_tokens_forward`, and the sum is the positional embedding's broadcast
//! `add`. Under autocast the 16-bit patches and the f32 class token concatenate to f32 tokens
//! (`cat`'s own type promotion: CUDA's autocast does not wrap `cat`, so nothing is copied
//! first); backward casts the patches' gradient back to half, which the kernel does as it
//! transposes it.

use serde::{Deserialize, Serialize};

use super::check::{extent, image, product};
use super::conv2d::{Conv2d, Conv2dSpec};
use super::positional_embedding::broadcast_add;
use super::residual::promoted;
use super::{LayerError, Module, Parameter, Parameters, Path, Token, Values};
use crate::memory::Storage;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// The bound of the class token's and the position embedding's first values.
const TOKEN_INIT_SCALE: f32 = 0.02;

/// A patch embedding's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchEmbeddingSpec {
    /// Values a token (`hidden_size`).
    pub embedding_dim: u64,
    /// Side of a square patch, the convolution's kernel and stride (`patch_size`).
    pub patch_size: u64,
}

impl PatchEmbeddingSpec {
    /// The embedding of a `[channels, height, width]` image.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<PatchEmbedding, LayerError> {
        let [_, height, width] = image(input, at, "patch_embedding")?;
        let dim = extent(at, "embedding_dim", self.embedding_dim, 1)?;
        let patch = extent(at, "patch_size", self.patch_size, 1)?;
        if height % patch != 0 || width % patch != 0 {
            return Err(at.error_at(
                "patch_size",
                format!("{patch} does not divide the {height} x {width} image into patches"),
            ));
        }
        let conv = Conv2dSpec {
            out_channels: dim,
            kernel_size: patch,
            stride: patch,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
        }
        .build(input, at)?;
        let patches = (height / patch) * (width / patch);
        let tokens = patches + 1;
        product(&[tokens, dim], at)?;
        Ok(PatchEmbedding {
            conv,
            patches,
            dim,
            shape: vec![tokens, dim],
        })
    }
}

/// A patch embedding.
#[derive(Debug, Clone)]
pub struct PatchEmbedding {
    conv: Conv2d,
    patches: u64,
    dim: u64,
    shape: Vec<u64>,
}

impl Module for PatchEmbedding {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn parameters(&self) -> Vec<Parameter> {
        let mut declared = self.conv.parameters();
        // torchvision's `class_token` `[1, 1, dim]` and `pos_embedding` `[1, patches + 1, dim]`.
        declared.push(Parameter::trained(self.dim, TOKEN_INIT_SCALE).of_rows(1));
        declared
            .push(Parameter::trained((self.patches + 1) * self.dim, TOKEN_INIT_SCALE).of_rows(1));
        declared
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let planes = self.conv.forward(graph, x, parameters);
        let class = parameters.take();
        let positions = parameters.take();
        let planes_storage = graph.storage(planes);
        let storage = promoted(planes_storage, graph.storage(class));
        let len = graph.elements(planes);
        let tokens = graph.times_rows((self.patches + 1) * self.dim);
        let tokens = graph.output(tokens, storage);
        graph.emit(Instr::PatchTokensForward {
            planes: graph.slot(planes),
            class: graph.slot(class),
            out: graph.slot(tokens),
            rows: graph.rows(),
            tokens: self.patches,
            dim: self.dim,
        });
        let backward = PatchTokensBackward {
            planes: (len, planes_storage),
            patches: self.patches,
            dim: self.dim,
        };
        graph.record(backward, &[planes, class], &[], &[tokens]);
        graph.release(planes);
        let y = broadcast_add(graph, tokens, positions);
        graph.release(tokens);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64> {
        let planes = self.conv.reference(x, rows, values, seed);
        let class = values.take();
        let positions = values.take();
        let (t, d) = (self.patches as usize, self.dim as usize);
        (0..rows * (t + 1) * d)
            .map(|k| {
                let (sample, token, c) = (k / ((t + 1) * d), (k / d) % (t + 1), k % d);
                let value = match token {
                    0 => class[c],
                    _ => planes[(sample * d + c) * t + token - 1],
                };
                value + positions[token * d + c]
            })
            .collect()
    }

    fn multiply_adds(&self) -> u64 {
        self.conv.multiply_adds()
    }

    fn token(&self) -> Token {
        Token::Layer(format!("patches{}x{}", self.patches, self.dim))
    }
}

/// The tokens' backward: the patches' gradient transposed back to the convolution's layout
/// (and cast to its storage), and the class token's summed over the batch.
#[derive(Debug)]
struct PatchTokensBackward {
    /// Elements and storage of the convolution's output.
    planes: (u64, Storage),
    patches: u64,
    dim: u64,
}

impl Backward for PatchTokensBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dout) = grads[0] else {
            return vec![None, None];
        };
        let (len, storage) = self.planes;
        let dplanes = pass.gradient(0, len, storage);
        let dclass = pass.gradient(1, self.dim, pass.storage(dout));
        pass.emit(Instr::PatchTokensBackward {
            dout: pass.slot(dout),
            dplanes: pass.slot(dplanes),
            dclass: pass.slot(dclass),
            rows: pass.rows(),
            tokens: self.patches,
            dim: self.dim,
        });
        // One sample expands the class token to its own shape: its gradient is a view of the
        // tokens' (no sum), which the parameter's `.grad` then keeps whole.
        if pass.rows() == 1 {
            pass.keep_alive_with(dclass, dout);
        }
        pass.where_needed([dplanes, dclass])
    }
}
