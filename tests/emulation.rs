//! The CUDA kernels, unchanged, on a CPU emulation of the CUDA execution model
//! (`tests/emulation/emulate.cpp`, built here with g++), launched with the same shapes as the GPU
//! launchers (`headroom::device::cuda::shapes`) and checked against the host reference by the
//! same parity suite the GPU runs. This proves the kernels' arithmetic and indexing without a GPU;
//! what only a GPU can show is listed in docs/gpu-runs.md.
//!
//! Needs g++ with C++20; skipped without it unless HEADROOM_REQUIRE_EMULATION=1 (CI sets it).

use std::ffi::{c_float, c_int, c_longlong, c_uint, c_ulonglong};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;
use headroom::device::cuda::shapes::{self, activation_code, GemmShape, Product};
use headroom::device::{Device, DeviceError, DeviceInfo, DeviceKind, StepReport};
use headroom::job::{Activation, OptimizerKind};
use headroom::parity::{check_kernels, check_training};
use headroom::step::{
    self, Allocate, Kernels, UpdateRule, ADAMW_WEIGHT_DECAY, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON,
    MOMENTUM,
};
use headroom::Plan;

/// Builds the emulator once per test process; `None` when g++ is missing.
fn library() -> Option<&'static libloading::Library> {
    static LIBRARY: OnceLock<Option<libloading::Library>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let output =
                std::env::temp_dir().join(format!("headroom-emulate-{}.so", std::process::id()));
            let built = Command::new("g++")
                .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-o"])
                .arg(&output)
                .arg(root.join("tests/emulation/emulate.cpp"))
                .status();
            match built {
                Ok(status) => assert!(status.success(), "g++ could not build the kernel emulator"),
                Err(_) => return None,
            }
            // SAFETY: the library is ours, built just now, with no initialisers of note.
            Some(unsafe { libloading::Library::new(&output) }.expect("the emulator loads"))
        })
        .as_ref()
}

fn emulator_or_skip() -> Option<&'static libloading::Library> {
    let library = library();
    if library.is_none() {
        assert_ne!(
            std::env::var("HEADROOM_REQUIRE_EMULATION").as_deref(),
            Ok("1"),
            "g++ is required for the kernel emulation"
        );
        eprintln!("skipped: g++ not found, the kernels were not emulated");
    }
    library
}

type Shape = [c_uint; 3];

fn dims(config: &LaunchConfig) -> (Shape, Shape) {
    let (g, b) = (config.grid_dim, config.block_dim);
    ([g.0, g.1, g.2], [b.0, b.1, b.2])
}

/// Looks up an emulated kernel launcher by its C name.
macro_rules! emulated {
    ($name:literal, fn($($arg:ty),* $(,)?)) => {{
        let library = library().expect("the emulator is built");
        // SAFETY: the signature matches the extern "C" launcher in emulate.cpp.
        unsafe { library.get::<unsafe extern "C" fn(*const c_uint, *const c_uint, $($arg),*)>($name.as_bytes()) }.expect($name)
    }};
}

/// A device whose kernels run on the emulator, on host memory.
struct EmulatedDevice;

const MULTIPROCESSORS: u32 = 2;

impl Allocate for EmulatedDevice {
    type F32 = Vec<f32>;
    type U32 = Vec<u32>;
    type Error = DeviceError;

    fn f32_zeroed(&mut self, len: u64) -> Result<Vec<f32>, DeviceError> {
        Ok(vec![0.0; len as usize])
    }

    fn u32_zeroed(&mut self, len: u64) -> Result<Vec<u32>, DeviceError> {
        Ok(vec![0; len as usize])
    }
}

impl EmulatedDevice {
    fn gemm(
        &mut self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let launch = shapes::gemm(&shape, MULTIPROCESSORS);
        if launch.accumulate {
            c.fill(0.0);
        }
        let product = match shape.product {
            Product::Nt => 0,
            Product::Tn => 1,
            Product::Nn => 2,
        };
        let (grid, block) = dims(&launch.config);
        let f = emulated!(
            "emu_gemm",
            fn(
                c_int,
                *const f32,
                *const f32,
                *mut f32,
                c_longlong,
                c_longlong,
                c_longlong,
                c_longlong,
                c_longlong,
                c_longlong,
                c_int,
            )
        );
        // SAFETY: buffers hold what the shape addresses, as on the GPU.
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                product,
                a.as_ptr(),
                b.as_ptr(),
                c.as_mut_ptr(),
                shape.m as i64,
                shape.n as i64,
                shape.k as i64,
                shape.lda as i64,
                shape.ldb as i64,
                launch.k_chunk as i64,
                launch.accumulate.into(),
            )
        };
        Ok(())
    }
}

impl Kernels for EmulatedDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn read_f32(&mut self, buffer: &Vec<f32>, len: u64) -> Result<Vec<f32>, DeviceError> {
        Ok(buffer[..len as usize].to_vec())
    }

    fn read_u32(&mut self, buffer: &Vec<u32>, len: u64) -> Result<Vec<u32>, DeviceError> {
        Ok(buffer[..len as usize].to_vec())
    }

    fn write_f32(&mut self, values: &[f32]) -> Result<Vec<f32>, DeviceError> {
        Ok(values.to_vec())
    }

    fn write_u32(&mut self, values: &[u32]) -> Result<Vec<u32>, DeviceError> {
        Ok(values.to_vec())
    }

    fn fill_uniform(
        &mut self,
        out: &mut Vec<f32>,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        let (grid, block) = dims(&shapes::elementwise(len));
        let f = emulated!(
            "emu_fill_uniform",
            fn(*mut f32, c_longlong, c_ulonglong, c_float)
        );
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                out.as_mut_ptr(),
                len as i64,
                key,
                scale,
            )
        };
        Ok(())
    }

    fn fill_labels(
        &mut self,
        labels: &mut Vec<u32>,
        inputs: &Vec<f32>,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (grid, block) = dims(&shapes::elementwise(rows));
        let f = emulated!(
            "emu_fill_labels",
            fn(*mut c_uint, *const f32, c_longlong, c_longlong, c_longlong)
        );
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                labels.as_mut_ptr(),
                inputs.as_ptr(),
                rows as i64,
                features as i64,
                classes as i64,
            )
        };
        Ok(())
    }

    fn linear_forward(
        &mut self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        y: &mut Vec<f32>,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(x, w, y, GemmShape::forward(rows, inputs, outputs))
    }

    fn weight_gradient(
        &mut self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        dw: &mut Vec<f32>,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, x, dw, GemmShape::weight_gradient(rows, inputs, outputs))
    }

    fn input_gradient(
        &mut self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        dx: &mut Vec<f32>,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, w, dx, GemmShape::input_gradient(rows, inputs, outputs))
    }

    fn bias_activation(
        &mut self,
        pre: &mut Vec<f32>,
        bias: &Vec<f32>,
        post: Option<&mut Vec<f32>>,
        rows: u64,
        cols: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (grid, block) = dims(&shapes::elementwise(rows * cols));
        match post {
            Some(post) => {
                let f = emulated!(
                    "emu_bias_activation",
                    fn(*mut f32, *const f32, *mut f32, c_longlong, c_longlong, c_int)
                );
                unsafe {
                    f(
                        grid.as_ptr(),
                        block.as_ptr(),
                        pre.as_mut_ptr(),
                        bias.as_ptr(),
                        post.as_mut_ptr(),
                        rows as i64,
                        cols as i64,
                        activation_code(activation),
                    )
                };
            }
            None => {
                let f = emulated!(
                    "emu_bias_add",
                    fn(*mut f32, *const f32, c_longlong, c_longlong)
                );
                unsafe {
                    f(
                        grid.as_ptr(),
                        block.as_ptr(),
                        pre.as_mut_ptr(),
                        bias.as_ptr(),
                        rows as i64,
                        cols as i64,
                    )
                };
            }
        }
        Ok(())
    }

    fn activation_backward(
        &mut self,
        grad_post: &Vec<f32>,
        pre: &mut Vec<f32>,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (grid, block) = dims(&shapes::elementwise(len));
        let f = emulated!(
            "emu_activation_backward",
            fn(*const f32, *mut f32, c_longlong, c_int)
        );
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                grad_post.as_ptr(),
                pre.as_mut_ptr(),
                len as i64,
                activation_code(activation),
            )
        };
        Ok(())
    }

    fn bias_gradient(
        &mut self,
        dy: &Vec<f32>,
        db: &mut Vec<f32>,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        db.fill(0.0);
        let (config, per_chunk) = shapes::column_sum(rows, cols, MULTIPROCESSORS);
        let (grid, block) = dims(&config);
        let f = emulated!(
            "emu_column_sum",
            fn(*const f32, *mut f32, c_longlong, c_longlong, c_longlong)
        );
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                dy.as_ptr(),
                db.as_mut_ptr(),
                rows as i64,
                cols as i64,
                per_chunk as i64,
            )
        };
        Ok(())
    }

    fn softmax_cross_entropy(
        &mut self,
        logits: &mut Vec<f32>,
        labels: &Vec<u32>,
        row_loss: &mut Vec<f32>,
        rows: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (grid, block) = dims(&shapes::softmax_cross_entropy(rows));
        let f = emulated!(
            "emu_softmax_cross_entropy",
            fn(*mut f32, *const c_uint, *mut f32, c_longlong, c_longlong, c_float)
        );
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                logits.as_mut_ptr(),
                labels.as_ptr(),
                row_loss.as_mut_ptr(),
                rows as i64,
                classes as i64,
                1.0 / rows as f32,
            )
        };
        Ok(())
    }

    fn mean(
        &mut self,
        values: &Vec<f32>,
        len: u64,
        accumulator: &mut Vec<f32>,
    ) -> Result<f32, DeviceError> {
        accumulator[0] = 0.0;
        let (grid, block) = dims(&shapes::mean(len));
        let f = emulated!("emu_mean", fn(*const f32, *mut f32, c_longlong));
        unsafe {
            f(
                grid.as_ptr(),
                block.as_ptr(),
                values.as_ptr(),
                accumulator.as_mut_ptr(),
                len as i64,
            )
        };
        Ok(accumulator[0])
    }

    fn optimizer_step(
        &mut self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        state: &mut [Vec<f32>],
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        let (grid, block) = dims(&shapes::elementwise(len));
        let (n, lr) = (len as i64, rule.learning_rate);
        match (rule.kind, state) {
            (OptimizerKind::Sgd, []) => {
                let f = emulated!("emu_sgd", fn(*mut f32, *const f32, c_longlong, c_float));
                unsafe {
                    f(
                        grid.as_ptr(),
                        block.as_ptr(),
                        param.as_mut_ptr(),
                        grad.as_ptr(),
                        n,
                        lr,
                    )
                };
            }
            (OptimizerKind::SgdMomentum, [velocity]) => {
                let f = emulated!(
                    "emu_sgd_momentum",
                    fn(*mut f32, *const f32, *mut f32, c_longlong, c_float, c_float)
                );
                unsafe {
                    f(
                        grid.as_ptr(),
                        block.as_ptr(),
                        param.as_mut_ptr(),
                        grad.as_ptr(),
                        velocity.as_mut_ptr(),
                        n,
                        lr,
                        MOMENTUM,
                    )
                };
            }
            (kind, [m, v]) => {
                let decay = if kind == OptimizerKind::Adamw {
                    ADAMW_WEIGHT_DECAY
                } else {
                    0.0
                };
                let (c1, c2) = rule.bias_correction;
                let f = emulated!(
                    "emu_adam",
                    fn(
                        *mut f32,
                        *const f32,
                        *mut f32,
                        *mut f32,
                        c_longlong,
                        c_float,
                        c_float,
                        c_float,
                        c_float,
                        c_float,
                        c_float,
                        c_float,
                    )
                );
                unsafe {
                    f(
                        grid.as_ptr(),
                        block.as_ptr(),
                        param.as_mut_ptr(),
                        grad.as_ptr(),
                        m.as_mut_ptr(),
                        v.as_mut_ptr(),
                        n,
                        lr,
                        ADAM_BETA1,
                        ADAM_BETA2,
                        ADAM_EPSILON,
                        c1,
                        c2,
                        decay,
                    )
                };
            }
            (kind, state) => {
                return Err(DeviceError::Fault(format!(
                    "{kind:?} with {} state buffers",
                    state.len()
                )))
            }
        }
        Ok(())
    }
}

impl Device for EmulatedDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Cuda,
            index: 0,
            name: "CPU emulation of kernels/*.cu".into(),
            total_bytes: 0,
            free_bytes: 0,
        }
    }

    fn run_steps(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: u32,
        seed: u64,
    ) -> Result<StepReport, DeviceError> {
        let (_, run) = step::run_probe(self, plan, batch_size, steps, seed)?;
        Ok(StepReport {
            step_seconds: run.step_seconds,
            device_bytes: 0,
            final_loss: run.final_loss,
        })
    }

    fn trained_parameters(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: u32,
        seed: u64,
    ) -> Result<Vec<f32>, DeviceError> {
        step::trained_parameters(self, plan, batch_size, steps, seed)
    }
}

#[test]
fn every_emulated_kernel_matches_the_host_reference() {
    if emulator_or_skip().is_none() {
        return;
    }
    let checks = check_kernels(&mut EmulatedDevice).unwrap();
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn emulated_training_matches_the_host_after_three_steps() {
    if emulator_or_skip().is_none() {
        return;
    }
    let checks = check_training(&mut EmulatedDevice).unwrap();
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
