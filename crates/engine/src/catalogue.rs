//! GPU what-ifs: the memory model's answer for cards people train on, without probing any.
//!
//! Each card's memory is `memory.total` as `nvidia-smi` reports it; the model assumes that much
//! less a reserve for the CUDA context and driver ([`CONTEXT_RESERVE_BYTES`]) is free (less
//! PyTorch's cuBLAS workspace too, for PyTorch's step), and rounds every buffer as the allocator
//! does. These are predictions, never measurements.

use serde::Serialize;

use crate::estimate::{self, Estimate};
use crate::job::Job;
use crate::plan::Framework;
use crate::plan::{Allocator, DoesNotFit};

/// Memory assumed taken by the CUDA context and driver before a probe: 1 GiB.
pub const CONTEXT_RESERVE_BYTES: u64 = 1 << 30;

/// What every what-if says of itself.
pub const MODEL_NOTE: &str = "memory model only, not a measurement: predicted from the \
    parameters, optimizer state, batch and activations at the step's peak, each buffer rounded \
    as the allocator does, on the card's memory less 1 GiB for the CUDA context (and, for \
    PyTorch, its cuBLAS workspace). The tests validate the PyTorch profile against PyTorch's own \
    accounting (MemTracker on the CPU, with CUDA's rules where the two differ) within 0.1%, \
    beyond the f32 statistics batch norm keeps on CUDA, for every example and hundreds of \
    generated layer lists; the host device and the CUDA stand-in run the same step program, so \
    their agreement with it is consistency, not validation. cuDNN's workspaces are not \
    modelled, and no GPU measurement has checked it yet (docs/gpu-runs.md)";

/// A card in the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpu {
    /// Its common name.
    pub name: &'static str,
    /// Memory as `nvidia-smi --query-gpu=memory.total` reports it, MiB.
    pub memory_mib: u64,
    /// Its architecture, `(major, minor)`.
    pub compute_capability: (u32, u32),
}

/// The oldest architecture headroom's kernels run on: CUDA 13's NVRTC compiles for compute
/// capability 7.5 (Turing) and newer.
pub const OLDEST_PROBED: (u32, u32) = (7, 5);

impl Gpu {
    /// Memory in all, bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Whether headroom can probe this card (its estimate holds either way: it describes the
    /// training step, not headroom's kernels).
    pub fn can_probe(&self) -> bool {
        self.compute_capability >= OLDEST_PROBED
    }
}

/// The workspace PyTorch's cuBLAS handle takes through the caching allocator at the first
/// matrix product, by default (`CUBLAS_WORKSPACE_CONFIG` unset): 32 MiB on compute capability
/// 9.x (Hopper), else `4096 KiB x 2 + 16 KiB x 8`. From PyTorch's source
/// (`CublasHandlePool.cpp`); docs/gpu-runs.md lists its check on a GPU.
pub fn pytorch_cublas_workspace_bytes(compute_capability: (u32, u32)) -> u64 {
    match compute_capability {
        (9, _) => 32 << 20,
        _ => (4096 << 10) * 2 + (16 << 10) * 8,
    }
}

/// Common training and inference cards.
pub const CATALOGUE: &[Gpu] = &[
    Gpu {
        name: "T4",
        memory_mib: 15_360,
        compute_capability: (7, 5),
    },
    Gpu {
        name: "L4",
        memory_mib: 23_034,
        compute_capability: (8, 9),
    },
    Gpu {
        name: "A10",
        memory_mib: 23_028,
        compute_capability: (8, 6),
    },
    Gpu {
        name: "RTX 4090",
        memory_mib: 24_564,
        compute_capability: (8, 9),
    },
    Gpu {
        name: "V100 32GB",
        memory_mib: 32_768,
        compute_capability: (7, 0),
    },
    Gpu {
        name: "A100 40GB",
        memory_mib: 40_960,
        compute_capability: (8, 0),
    },
    Gpu {
        name: "L40S",
        memory_mib: 46_068,
        compute_capability: (8, 9),
    },
    Gpu {
        name: "A100 80GB",
        memory_mib: 81_920,
        compute_capability: (8, 0),
    },
    Gpu {
        name: "H100 80GB",
        memory_mib: 81_559,
        compute_capability: (9, 0),
    },
    Gpu {
        name: "H100 NVL",
        memory_mib: 95_830,
        compute_capability: (9, 0),
    },
    Gpu {
        name: "H200 141GB",
        memory_mib: 143_771,
        compute_capability: (9, 0),
    },
];

fn normalise(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// A card name the catalogue cannot resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownGpu {
    /// No card has that name.
    #[error("unknown GPU `{name}`; known: {}", .known.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// Every card of the catalogue.
        known: Vec<&'static str>,
    },
    /// The name starts several cards' names.
    #[error("`{name}` could be {}; say which", .candidates.join(" or "))]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The cards it could be.
        candidates: Vec<&'static str>,
    },
}

/// The card called `name` (any case, spaces and dashes ignored: `h100`, `A100-80GB`), or an
/// error listing the known names.
pub fn find(name: &str) -> Result<&'static Gpu, UnknownGpu> {
    let wanted = normalise(name);
    if let Some(gpu) = CATALOGUE.iter().find(|g| normalise(g.name) == wanted) {
        return Ok(gpu);
    }
    let matches: Vec<&Gpu> = CATALOGUE
        .iter()
        .filter(|g| !wanted.is_empty() && normalise(g.name).starts_with(&wanted))
        .collect();
    match matches[..] {
        [gpu] => Ok(gpu),
        [] => Err(UnknownGpu::Unknown {
            name: name.into(),
            known: CATALOGUE.iter().map(|g| g.name).collect(),
        }),
        _ => Err(UnknownGpu::Ambiguous {
            name: name.into(),
            candidates: matches.iter().map(|g| g.name).collect(),
        }),
    }
}

/// The memory model's answer for one card.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuEstimate {
    /// The card.
    pub gpu: String,
    /// Its memory in all, bytes.
    pub total_bytes: u64,
    /// The largest and recommended batch, when batch size 1 fits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// Why it does not fit, when it does not (in words, in JSON).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "in_words")]
    pub does_not_fit: Option<DoesNotFit>,
}

/// The estimate of `job` on `gpu`: its memory less the context reserve and, for PyTorch's
/// step, its cuBLAS workspace; each buffer rounded as PyTorch's caching allocator (or, for
/// headroom's step, the CUDA driver) rounds it.
pub fn estimate_for(job: &Job, gpu: &Gpu) -> GpuEstimate {
    estimate_on(job, gpu.name, gpu.memory_bytes(), gpu.compute_capability)
}

/// The estimate of `job` on a card called `name` with `total_bytes` of memory and the
/// architecture `compute_capability`, as [`estimate_for`] makes it.
pub fn estimate_on(
    job: &Job,
    name: &str,
    total_bytes: u64,
    compute_capability: (u32, u32),
) -> GpuEstimate {
    let (reserve, allocator) = match job.framework {
        Framework::Pytorch => (
            CONTEXT_RESERVE_BYTES + pytorch_cublas_workspace_bytes(compute_capability),
            Allocator::PytorchCaching,
        ),
        Framework::Headroom => (CONTEXT_RESERVE_BYTES, Allocator::CudaPages),
    };
    let free = total_bytes.saturating_sub(reserve);
    estimate_card(job, name.to_string(), total_bytes, free, allocator)
}

/// The estimate of `job` for `bytes` of free memory, each buffer charged exactly (as on the
/// host device).
pub fn estimate_free(job: &Job, bytes: u64) -> GpuEstimate {
    let name = format!("{} free", bytesize::ByteSize(bytes).display().iec());
    estimate_card(job, name, bytes, bytes, Allocator::Exact)
}

fn estimate_card(
    job: &Job,
    gpu: String,
    total_bytes: u64,
    free: u64,
    allocator: Allocator,
) -> GpuEstimate {
    let outcome = estimate::estimate(job, free, allocator);
    GpuEstimate {
        gpu,
        total_bytes,
        does_not_fit: outcome.as_ref().err().copied(),
        estimate: outcome.ok(),
    }
}

/// Writes why a model does not fit as its message.
fn in_words<S: serde::Serializer>(
    does_not_fit: &Option<DoesNotFit>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match does_not_fit {
        Some(reason) => serializer.collect_str(reason),
        None => serializer.serialize_none(),
    }
}

/// The estimate of `job` on every card of the catalogue, smallest first.
pub fn every_gpu(job: &Job) -> Vec<GpuEstimate> {
    let mut cards: Vec<&Gpu> = CATALOGUE.iter().collect();
    cards.sort_by_key(|g| g.memory_mib);
    cards.iter().map(|g| estimate_for(job, g)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_loosely_and_unknown_ones_list_the_catalogue() {
        assert_eq!(find("h200").unwrap().name, "H200 141GB");
        assert_eq!(find("A100-80GB").unwrap().name, "A100 80GB");
        assert_eq!(find("rtx4090").unwrap().name, "RTX 4090");
        // Ambiguous prefixes are not guessed.
        let err = find("A100").unwrap_err().to_string();
        assert!(err.contains("A100 40GB or A100 80GB"), "{err}");
        let err = find("B300").unwrap_err().to_string();
        assert!(
            err.contains("unknown GPU `B300`") && err.contains("H100 80GB"),
            "{err}"
        );
        assert!(find("").is_err());
    }

    #[test]
    fn every_required_card_is_there() {
        for name in [
            "A100 40GB",
            "A100 80GB",
            "H100 80GB",
            "H200 141GB",
            "L4",
            "L40S",
            "RTX 4090",
            "T4",
        ] {
            assert!(find(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn a_larger_card_holds_a_larger_batch() {
        let job = crate::job::testing::mlp(&[3, 32, 32], &[128], 10, "adam", "");
        let rows = every_gpu(&job);
        assert_eq!(rows.len(), CATALOGUE.len());
        let sizes: Vec<u64> = rows
            .iter()
            .map(|r| r.estimate.as_ref().unwrap().predicted_max_batch_size)
            .collect();
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
        let deep = crate::job::testing::mlp(&[1 << 20], &[1 << 14, 1 << 14], 10, "adam", "");
        let t4 = estimate_for(&deep, find("T4").unwrap());
        assert!(t4.estimate.is_none());
        assert!(t4
            .does_not_fit
            .unwrap()
            .to_string()
            .contains("does not fit"));
    }
}
