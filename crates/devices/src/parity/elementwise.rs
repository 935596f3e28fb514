//! elementwise.cu: the bias over channels, every activation out of place and in place, its
//! gradient from what autograd saves of it (the input or the output), sums, products, a scale
//! per feature and accumulation.

use super::reference;
use super::{compare, poison, random, round, rounded, tolerance, Check, STORAGES};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::modules::activation::Nonlinearity;
use headroom_engine::plan::Storage;
use headroom_engine::program::SavedAs;

/// Every non-linearity, leaky relu with PyTorch's default slope and an odd one.
const NONLINEARITIES: [Nonlinearity; 9] = [
    Nonlinearity::Relu,
    Nonlinearity::GeluTanh,
    Nonlinearity::GeluErf,
    Nonlinearity::Tanh,
    Nonlinearity::Sigmoid,
    Nonlinearity::Silu,
    Nonlinearity::LeakyRelu { slope: 0.01 },
    Nonlinearity::LeakyRelu { slope: 0.3 },
    Nonlinearity::Relu6,
];

/// Runs the elementwise checks on `device`.
pub fn check_elementwise<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    // A residual block's 16-bit body and its f32 input, summed to f32 (and back into the body).
    checks.extend(check_mixed_sums(device, Storage::Bf16)?);
    checks.extend(check_mixed_sums(device, Storage::F16)?);
    for storage in STORAGES {
        checks.extend(check_sums(device, storage)?);
        checks.push(check_scale_features(device, storage)?);
        checks.extend(check_bias(device, storage)?);
        for nonlinearity in NONLINEARITIES {
            checks.extend(check_activation(device, nonlinearity, storage)?);
        }
    }
    Ok(checks)
}

/// `scale_features`: 37 rows of 29 features, each feature scaled by its own value.
fn check_scale_features<K: Transfer>(
    device: &mut K,
    storage: Storage,
) -> Result<Check, DeviceError> {
    let (rows, features) = (37, 29);
    let x = rounded(&random(rows * features, 49), storage);
    let scale = rounded(&random(features, 50), storage);
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| round(v * scale[i % features], storage))
        .collect();
    let (x_d, scale_d) = (
        device.write_values(&x, storage)?,
        device.write_values(&scale, storage)?,
    );
    let mut y = device.write_values(&poison(rows * features), storage)?;
    device.scale_features(&x_d, &scale_d, &mut y, rows as u64, features as u64)?;
    let got = device.read_values(&y, (rows * features) as u64)?;
    let name = format!("scale_features {rows}x{features} {storage:?}");
    Ok(compare(name, &got, &want, tolerance(storage)))
}

/// `add`, `multiply` and `accumulate`.
fn check_sums<K: Transfer>(device: &mut K, storage: Storage) -> Result<Vec<Check>, DeviceError> {
    let (a, b) = (
        rounded(&random(1000, 47), storage),
        rounded(&random(1000, 48), storage),
    );
    let want: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| round(x + y, storage))
        .collect();
    let (a_d, mut b_d) = (
        device.write_values(&a, storage)?,
        device.write_values(&b, storage)?,
    );
    let mut sum = device.write_values(&poison(1000), storage)?;
    device.add(&a_d, &b_d, &mut sum, 1000)?;
    let added = device.read_values(&sum, 1000)?;
    let products: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| round(x * y, storage))
        .collect();
    let mut product = device.write_values(&poison(1000), storage)?;
    device.multiply(&a_d, &b_d, &mut product, 1000)?;
    let multiplied = device.read_values(&product, 1000)?;
    device.accumulate(&a_d, &mut b_d, 1000)?;
    let accumulated = device.read_values(&b_d, 1000)?;
    let tolerance = tolerance(storage);
    Ok(vec![
        compare(format!("add 1000 {storage:?}"), &added, &want, tolerance),
        compare(
            format!("multiply 1000 {storage:?}"),
            &multiplied,
            &products,
            tolerance,
        ),
        compare(
            format!("accumulate 1000 {storage:?}"),
            &accumulated,
            &want,
            tolerance,
        ),
    ])
}

/// `add` of a `half` and an f32 buffer into f32, and `accumulate` of the f32 one into the
/// `half` one.
fn check_mixed_sums<K: Transfer>(device: &mut K, half: Storage) -> Result<Vec<Check>, DeviceError> {
    let (a, b) = (rounded(&random(1000, 49), half), random(1000, 50));
    let exact: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let (a_d, b_d) = (
        device.write_values(&a, half)?,
        device.write_values(&b, Storage::F32)?,
    );
    let mut sum = device.write_values(&poison(1000), Storage::F32)?;
    device.add(&a_d, &b_d, &mut sum, 1000)?;
    let added = device.read_values(&sum, 1000)?;
    let mut into = device.write_values(&a, half)?;
    device.accumulate(&b_d, &mut into, 1000)?;
    let accumulated = device.read_values(&into, 1000)?;
    Ok(vec![
        compare(
            format!("add 1000 {half:?}+F32->F32"),
            &added,
            &exact,
            tolerance(Storage::F32),
        ),
        compare(
            format!("accumulate 1000 F32 into {half:?}"),
            &accumulated,
            &rounded(&exact, half),
            tolerance(half),
        ),
    ])
}

/// `bias_add` over rows x channels, and over rows x channels x positions.
fn check_bias<K: Transfer>(device: &mut K, storage: Storage) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (rows, cols, spatial) in [(1usize, 1usize, 1usize), (1000, 784, 1), (7, 129, 49)] {
        let len = rows * cols * spatial;
        let values = rounded(&random(len, 9), storage);
        let bias_values = rounded(&random(cols, 10), storage);
        let mut y = device.write_values(&values, storage)?;
        let bias = device.write_values(&bias_values, storage)?;
        let (r, c, k) = (rows as u64, cols as u64, spatial as u64);
        device.bias_add(&mut y, &bias, r, c, k)?;
        let want: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| round(v + bias_values[i / spatial % cols], storage))
            .collect();
        checks.push(compare(
            format!("bias add {rows}x{cols}x{spatial} {storage:?}"),
            &device.read_values(&y, len as u64)?,
            &want,
            tolerance(storage),
        ));
    }
    Ok(checks)
}

/// One non-linearity: forward out of place and in place, and its gradient from each tensor
/// autograd may save of it.
fn check_activation<K: Transfer>(
    device: &mut K,
    nonlinearity: Nonlinearity,
    storage: Storage,
) -> Result<Vec<Check>, DeviceError> {
    let tolerance = tolerance(storage);
    let len = 129 * 7;
    let n = len as u64;
    // Inputs over [-8, 8]: past relu6's clamp and far into sigmoid's and tanh's tails.
    let inputs: Vec<f32> = random(len, 6)
        .iter()
        .map(|v| round(v * 8.0, storage))
        .collect();
    let want: Vec<f32> = inputs
        .iter()
        .map(|&x| round(nonlinearity.apply(f64::from(x)) as f32, storage))
        .collect();
    let name = format!("{} {len} {storage:?}", describe(nonlinearity));
    let x = device.write_values(&inputs, storage)?;
    let mut y = device.write_values(&poison(len), storage)?;
    device.activation_forward(&x, &mut y, n, nonlinearity)?;
    let outputs = device.read_values(&y, n)?;
    let mut checks = vec![compare(
        format!("{name} forward"),
        &outputs,
        &want,
        tolerance,
    )];
    let mut in_place = device.write_values(&inputs, storage)?;
    device.activation_in_place(&mut in_place, n, nonlinearity)?;
    checks.push(compare(
        format!("{name} in place"),
        &device.read_values(&in_place, n)?,
        &want,
        tolerance,
    ));

    let grad = rounded(&random(len, 8), storage);
    let grad_d = device.write_values(&grad, storage)?;
    let saves = [SavedAs::Input, SavedAs::Output];
    for saved_as in saves
        .into_iter()
        .filter(|&s| reference::recoverable(nonlinearity, s))
    {
        let (saved, saved_values) = match saved_as {
            SavedAs::Input => (&x, &inputs),
            SavedAs::Output => (&y, &outputs),
        };
        let mut out = device.write_values(&poison(len), storage)?;
        device.activation_gradient(&grad_d, saved, &mut out, n, nonlinearity, saved_as)?;
        let want: Vec<f32> = grad
            .iter()
            .zip(saved_values)
            .map(|(&g, &s)| {
                let slope = reference::derivative(nonlinearity, f64::from(s), saved_as);
                round((f64::from(g) * slope) as f32, storage)
            })
            .collect();
        checks.push(compare(
            format!("{name} gradient from its {saved_as:?}"),
            &device.read_values(&out, n)?,
            &want,
            tolerance,
        ));
    }
    Ok(checks)
}

/// A non-linearity's name with its parameter.
fn describe(nonlinearity: Nonlinearity) -> String {
    match nonlinearity {
        Nonlinearity::LeakyRelu { slope } => format!("leaky_relu({slope})"),
        other => other.name().to_string(),
    }
}
