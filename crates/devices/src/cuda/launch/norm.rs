//! norm.cu: batch norm in training mode, and layer norm, forward and backward.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to_mut, holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::batch_norm::Planes;
use headroom_engine::modules::layer_norm::NormalizedRows;
use headroom_engine::program::{
    Affine, BatchStatistics, LayerAffine, RowStatistics, RunningStatistics,
};
use headroom_engine::step::Norm;

/// The kernels' shape arguments: rows, channels, spatial.
fn shape(planes: &Planes) -> [i64; 3] {
    [planes.rows, planes.channels, planes.spatial].map(|v| v as i64)
}

impl Norm for CudaDevice {
    fn batch_norm_forward(
        &mut self,
        x: &DeviceValues,
        affine: Option<Affine<&DeviceValues>>,
        y: &mut DeviceValues,
        saved: &mut BatchStatistics<DeviceValues>,
        running: &mut RunningStatistics<DeviceValues, CudaSlice<i64>>,
        planes: &Planes,
    ) -> Result<(), DeviceError> {
        let (len, channels) = (planes.values(), planes.channels);
        let [r, c, k] = shape(planes);
        let has_affine = i32::from(affine.is_some());
        // Without an affine transform the kernel reads no scale or shift; it is given `x`, live
        // and unused.
        let (scale, shift) = affine.map_or((x, x), |a| (a.scale, a.shift));
        let (scale_len, eps, momentum) = (
            if has_affine == 1 { channels } else { 0 },
            planes.eps,
            planes.momentum,
        );
        let (storage, param_storage) = (x.storage.code(), running.mean.storage.code());
        launch!(self, Kernel::BatchNormForward, shapes::block_per_channel(channels);
            holds(x, len), holds(scale, scale_len), holds(shift, scale_len), &has_affine,
            holds_mut(y, len), holds_mut(&mut saved.mean, channels),
            holds_mut(&mut saved.invstd, channels), holds_mut(&mut running.mean, channels),
            holds_mut(&mut running.var, channels), elements_up_to_mut(&mut running.steps, 1),
            &r, &c, &k, &eps, &momentum, &storage, &param_storage)
    }

    fn batch_norm_backward(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        scale: Option<&DeviceValues>,
        saved: BatchStatistics<&DeviceValues>,
        dx: Option<&mut DeviceValues>,
        affine: Option<Affine<&mut DeviceValues>>,
        planes: &Planes,
    ) -> Result<(), DeviceError> {
        let (len, channels) = (planes.values(), planes.channels);
        let [r, c, k] = shape(planes);
        let has_scale = i32::from(scale.is_some());
        let (has_dx, has_affine_grad) = (i32::from(dx.is_some()), i32::from(affine.is_some()));
        let storage = dy.storage.code();
        let param_storage = scale.map_or(storage, |s| s.storage.code());
        let grad_storage = affine.as_ref().map_or(storage, |a| a.scale.storage.code());
        // A buffer the flags say is absent is given `x` (or `dy`), live and unread.
        let scale = holds(
            scale.unwrap_or(x),
            if has_scale == 1 { channels } else { 0 },
        );
        let (mean, invstd) = (holds(saved.mean, channels), holds(saved.invstd, channels));
        let config = shapes::block_per_channel(channels);
        match (dx, affine) {
            (Some(dx), Some(affine)) => launch!(self, Kernel::BatchNormBackward, config;
                holds(dy, len), holds(x, len), scale, &has_scale, mean, invstd,
                holds_mut(dx, len), &has_dx, holds_mut(affine.scale, channels),
                holds_mut(affine.shift, channels), &has_affine_grad, &r, &c, &k, &storage,
                &param_storage, &grad_storage),
            (Some(dx), None) => launch!(self, Kernel::BatchNormBackward, config;
                holds(dy, len), holds(x, len), scale, &has_scale, mean, invstd,
                holds_mut(dx, len), &has_dx, holds(x, 0), holds(dy, 0), &has_affine_grad,
                &r, &c, &k, &storage, &param_storage, &grad_storage),
            (None, Some(affine)) => launch!(self, Kernel::BatchNormBackward, config;
                holds(dy, len), holds(x, len), scale, &has_scale, mean, invstd, holds(x, 0),
                &has_dx, holds_mut(affine.scale, channels), holds_mut(affine.shift, channels),
                &has_affine_grad, &r, &c, &k, &storage, &param_storage, &grad_storage),
            (None, None) => Ok(()),
        }
    }

    fn layer_norm_forward(
        &mut self,
        x: &DeviceValues,
        affine: Option<LayerAffine<&DeviceValues>>,
        y: &mut DeviceValues,
        saved: &mut RowStatistics<DeviceValues>,
        rows: &NormalizedRows,
    ) -> Result<(), DeviceError> {
        let (len, r, n) = (rows.values(), rows.rows, rows.features);
        // An absent scale or shift is given `x`, live and unread.
        let scale = affine.map(|a| a.scale);
        let shift = affine.and_then(|a| a.shift);
        let (has_scale, has_shift) = (i32::from(scale.is_some()), i32::from(shift.is_some()));
        let param_storage = scale.map_or(x.storage.code(), |s| s.storage.code());
        let features = |present: i32| if present == 1 { n } else { 0 };
        let (storage, eps) = (x.storage.code(), rows.eps);
        let [r64, n64] = [r, n].map(|v| v as i64);
        let centered = i32::from(saved.mean.is_some());
        let config = shapes::block_per_channel(r);
        let (scale, shift) = (
            holds(scale.unwrap_or(x), features(has_scale)),
            holds(shift.unwrap_or(x), features(has_shift)),
        );
        match &mut saved.mean {
            Some(mean) => launch!(self, Kernel::LayerNormForward, config;
                holds(x, len), scale, &has_scale, shift, &has_shift, holds_mut(y, len),
                holds_mut(mean, r), holds_mut(&mut saved.rstd, r), &centered, &r64, &n64, &eps,
                &storage, &param_storage),
            // RMS norm's absent mean is given `x`, live and unread.
            None => launch!(self, Kernel::LayerNormForward, config;
                holds(x, len), scale, &has_scale, shift, &has_shift, holds_mut(y, len),
                holds(x, 0), holds_mut(&mut saved.rstd, r), &centered, &r64, &n64, &eps,
                &storage, &param_storage),
        }
    }

    fn layer_norm_backward(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        scale: Option<&DeviceValues>,
        saved: RowStatistics<&DeviceValues>,
        dx: Option<&mut DeviceValues>,
        affine: Option<LayerAffine<&mut DeviceValues>>,
        rows: &NormalizedRows,
    ) -> Result<(), DeviceError> {
        let (len, r, n) = (rows.values(), rows.rows, rows.features);
        let [r64, n64] = [r, n].map(|v| v as i64);
        let storage = dy.storage.code();
        let centered = i32::from(saved.mean.is_some());
        // RMS norm's absent mean is given the rstd buffer, unread.
        let (mean, rstd) = (
            holds(saved.mean.unwrap_or(saved.rstd), r),
            holds(saved.rstd, r),
        );
        if let Some(dx) = dx {
            let has_scale = i32::from(scale.is_some());
            let param_storage = scale.map_or(storage, |s| s.storage.code());
            // Without a scale the kernel is given `x`, live and unread.
            let scale = holds(scale.unwrap_or(x), if has_scale == 1 { n } else { 0 });
            launch!(self, Kernel::LayerNormInputGradient, shapes::block_per_channel(r);
                holds(dy, len), holds(x, len), scale, &has_scale, mean, rstd, &centered,
                holds_mut(dx, len), &r64, &n64, &storage, &param_storage)?;
        }
        let Some(affine) = affine else {
            return Ok(());
        };
        let grad_storage = affine.scale.storage.code();
        let has_dshift = i32::from(affine.shift.is_some());
        let config = shapes::block_per_channel(n);
        match affine.shift {
            Some(dshift) => launch!(self, Kernel::LayerNormParameterGradient, config;
                holds(dy, len), holds(x, len), mean, rstd, &centered, holds_mut(affine.scale, n),
                holds_mut(dshift, n), &has_dshift, &r64, &n64, &storage, &grad_storage),
            None => launch!(self, Kernel::LayerNormParameterGradient, config;
                holds(dy, len), holds(x, len), mean, rstd, &centered, holds_mut(affine.scale, n),
                holds(dy, 0), &has_dshift, &r64, &n64, &storage, &grad_storage),
        }
    }
}
