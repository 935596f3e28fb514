//! Checks of `embedding.cu` and `fill.cu`'s tokens: the lookup and the table's gradient (ids
//! repeated, a padding row) against a reference written here in f64, in the storages the
//! precisions use; token ids and drawn labels bit for bit against the engine's stream; a ViT's
//! patch tokens and the first token, and their backward, in the storage combinations the
//! precisions use (16-bit planes under f32 tokens under autocast).

use super::{compare, compare_bits, poison, random, round, rounded, tolerance, Check, STORAGES};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::synthetic;

/// Runs the embedding and token checks on `device`.
pub fn check_embedding<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = check_tokens(device)?;
    // (tokens, dim, vocab, padding): one token; ids repeated, more columns than a block's
    // threads; a padding row.
    let cases = [
        (1u64, 1u64, 1u64, None),
        (40, 300, 7, None),
        (33, 8, 5, Some(2u64)),
    ];
    for storage in STORAGES {
        for (tokens, dim, vocab, padding) in cases {
            checks.extend(check_case(device, storage, (tokens, dim, vocab), padding)?);
        }
        for shape in [(1u64, 1u64, 1u64), (3, 49, 300), (2, 4, 5)] {
            checks.extend(check_patch_tokens(device, [storage, storage], shape)?);
            checks.extend(check_first_token(device, storage, shape)?);
            checks.extend(check_mean_tokens(device, storage, shape)?);
        }
    }
    for planes in [Storage::Bf16, Storage::F16] {
        checks.extend(check_patch_tokens(
            device,
            [planes, Storage::F32],
            (3, 49, 300),
        )?);
    }
    Ok(checks)
}

/// `patch_tokens_forward` and its backward over `(rows, tokens, dim)`, the planes and their
/// gradient stored as `planes`, the tokens and the class token as `tokens`.
fn check_patch_tokens<K: Transfer>(
    device: &mut K,
    [planes_storage, storage]: [Storage; 2],
    (rows, tokens, dim): (u64, u64, u64),
) -> Result<Vec<Check>, DeviceError> {
    let (n, t, d) = (rows as usize, tokens as usize, dim as usize);
    let planes = rounded(&random(n * d * t, 62), planes_storage);
    let class = rounded(&random(d, 63), storage);
    let dout = rounded(&random(n * (t + 1) * d, 64), storage);
    let want_out: Vec<f32> = (0..n * (t + 1) * d)
        .map(|k| {
            let (s, p, c) = (k / ((t + 1) * d), (k / d) % (t + 1), k % d);
            if p == 0 {
                class[c]
            } else {
                planes[(s * d + c) * t + p - 1]
            }
        })
        .collect();
    let want_dplanes: Vec<f32> = (0..n * d * t)
        .map(|k| {
            let (s, c, p) = (k / (d * t), (k / t) % d, k % t);
            round(dout[(s * (t + 1) + p + 1) * d + c], planes_storage)
        })
        .collect();
    let want_dclass: Vec<f32> = (0..d)
        .map(|c| {
            (0..n)
                .map(|s| dout[s * (t + 1) * d + c] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let planes_d = device.write_values(&planes, planes_storage)?;
    let class_d = device.write_values(&class, storage)?;
    let mut out = device.write_values(&poison(want_out.len()), storage)?;
    device.patch_tokens_forward(&planes_d, &class_d, &mut out, rows, tokens, dim)?;
    let dout_d = device.write_values(&dout, storage)?;
    let mut dplanes = device.write_values(&poison(n * d * t), planes_storage)?;
    let mut dclass = device.write_values(&poison(d), storage)?;
    device.patch_tokens_backward(&dout_d, &mut dplanes, &mut dclass, rows, tokens, dim)?;
    let shape = format!("{rows} x {tokens} x {dim} {planes_storage:?} -> {storage:?}");
    Ok(vec![
        compare_bits(
            format!("patch tokens {shape}"),
            &device.read_values(&out, want_out.len() as u64)?,
            &rounded(&want_out, storage),
        ),
        compare_bits(
            format!("patch tokens' planes gradient {shape}"),
            &device.read_values(&dplanes, (n * d * t) as u64)?,
            &want_dplanes,
        ),
        compare(
            format!("patch tokens' class gradient {shape}"),
            &device.read_values(&dclass, dim)?,
            &want_dclass,
            tolerance(storage),
        ),
    ])
}

/// `first_token_forward` and its backward over `(rows, positions, dim)`.
fn check_first_token<K: Transfer>(
    device: &mut K,
    storage: Storage,
    (rows, positions, dim): (u64, u64, u64),
) -> Result<Vec<Check>, DeviceError> {
    let (n, p, d) = (rows as usize, positions as usize, dim as usize);
    let x = rounded(&random(n * p * d, 65), storage);
    let dy = rounded(&random(n * d, 66), storage);
    let want_y: Vec<f32> = (0..n * d).map(|k| x[(k / d) * p * d + k % d]).collect();
    let want_dx: Vec<f32> = (0..n * p * d)
        .map(|k| match k % (p * d) < d {
            true => dy[(k / (p * d)) * d + k % (p * d)],
            false => 0.0,
        })
        .collect();
    let x_d = device.write_values(&x, storage)?;
    let mut y = device.write_values(&poison(n * d), storage)?;
    device.first_token_forward(&x_d, &mut y, rows, positions, dim)?;
    let dy_d = device.write_values(&dy, storage)?;
    let mut dx = device.write_values(&poison(n * p * d), storage)?;
    device.first_token_backward(&dy_d, &mut dx, rows, positions, dim)?;
    let shape = format!("{rows} x {positions} x {dim} {storage:?}");
    Ok(vec![
        compare_bits(
            format!("first token {shape}"),
            &device.read_values(&y, rows * dim)?,
            &want_y,
        ),
        compare_bits(
            format!("first token's gradient {shape}"),
            &device.read_values(&dx, rows * positions * dim)?,
            &want_dx,
        ),
    ])
}

/// `mean_tokens_forward` and its backward over `(rows, positions, dim)`, against the mean in
/// f64.
fn check_mean_tokens<K: Transfer>(
    device: &mut K,
    storage: Storage,
    (rows, positions, dim): (u64, u64, u64),
) -> Result<Vec<Check>, DeviceError> {
    let (n, p, d) = (rows as usize, positions as usize, dim as usize);
    let x = rounded(&random(n * p * d, 67), storage);
    let dy = rounded(&random(n * d, 68), storage);
    let want_y: Vec<f32> = (0..n * d)
        .map(|k| {
            let column = (0..p).map(|t| f64::from(x[(k / d) * p * d + t * d + k % d]));
            (column.sum::<f64>() / p as f64) as f32
        })
        .collect();
    let want_dx: Vec<f32> = (0..n * p * d)
        .map(|k| (f64::from(dy[(k / (p * d)) * d + k % d]) / p as f64) as f32)
        .collect();
    let x_d = device.write_values(&x, storage)?;
    let mut y = device.write_values(&poison(n * d), storage)?;
    device.mean_tokens_forward(&x_d, &mut y, rows, positions, dim)?;
    let dy_d = device.write_values(&dy, storage)?;
    let mut dx = device.write_values(&poison(n * p * d), storage)?;
    device.mean_tokens_backward(&dy_d, &mut dx, rows, positions, dim)?;
    let shape = format!("{rows} x {positions} x {dim} {storage:?}");
    Ok(vec![
        compare(
            format!("mean of the tokens {shape}"),
            &device.read_values(&y, rows * dim)?,
            &rounded(&want_y, storage),
            tolerance(storage),
        ),
        compare(
            format!("mean of the tokens' gradient {shape}"),
            &device.read_values(&dx, rows * positions * dim)?,
            &rounded(&want_dx, storage),
            tolerance(storage),
        ),
    ])
}

/// `fill_tokens` into int64 ids and u32 labels.
fn check_tokens<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (len, vocab) in [(1u64, 1u64), (1000, 50_257), (7 * 129, 10)] {
        let key = synthetic::stream_key(5, 6);
        let want: Vec<u64> = (0..len).map(|i| synthetic::token(key, i, vocab)).collect();
        // Ids and labels below 2^24 are exact as f32.
        let as_f32 = |v: &mut dyn Iterator<Item = u64>| v.map(|t| t as f32).collect::<Vec<_>>();
        let mut ids = device.write_index(&vec![-1; len as usize])?;
        device.fill_token_ids(&mut ids, len, key, vocab)?;
        let got = device.read_index(&ids, len)?;
        checks.push(compare_bits(
            format!("fill_tokens ids n={len} vocab={vocab}"),
            &as_f32(&mut got.iter().map(|&t| t as u64)),
            &as_f32(&mut want.iter().copied()),
        ));
        let mut labels = device.write_u32(&vec![u32::MAX; len as usize])?;
        device.fill_token_labels(&mut labels, len, key, vocab)?;
        let got = device.read_u32(&labels, len)?;
        checks.push(compare_bits(
            format!("fill_tokens labels n={len} classes={vocab}"),
            &as_f32(&mut got.iter().map(|&t| u64::from(t))),
            &as_f32(&mut want.iter().copied()),
        ));
    }
    Ok(checks)
}

fn check_case<K: Transfer>(
    device: &mut K,
    storage: Storage,
    (tokens, dim, vocab): (u64, u64, u64),
    padding: Option<u64>,
) -> Result<Vec<Check>, DeviceError> {
    let (n, d) = (tokens as usize, dim as usize);
    let ids: Vec<i64> = (0..tokens)
        .map(|i| ((i * 3 + i / 2) % vocab) as i64)
        .collect();
    let table = rounded(&random((vocab * dim) as usize, 60), storage);
    let dy = rounded(&random(n * d, 61), storage);
    let want_y: Vec<f32> = ids
        .iter()
        .flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].to_vec())
        .collect();
    // Summed in token order, each sum rounded to the storage, as the kernel defines it.
    let mut want_dw = vec![0.0f32; (vocab * dim) as usize];
    for (i, &id) in ids.iter().enumerate() {
        if padding != Some(id as u64) {
            for j in 0..d {
                let at = id as usize * d + j;
                want_dw[at] = round(want_dw[at] + dy[i * d + j], storage);
            }
        }
    }

    let ids_d = device.write_index(&ids)?;
    let table_d = device.write_values(&table, storage)?;
    let mut y = device.write_values(&poison(n * d), storage)?;
    device.embedding_forward(&ids_d, &table_d, &mut y, tokens, dim)?;
    let dy_d = device.write_values(&dy, storage)?;
    let mut dw = device.write_values(&poison((vocab * dim) as usize), storage)?;
    device.embedding_backward(&dy_d, &ids_d, &mut dw, tokens, dim, vocab, padding)?;
    let shape = format!("{tokens} tokens x {dim} of {vocab} padding={padding:?} {storage:?}");
    Ok(vec![
        compare_bits(
            format!("embedding lookup {shape}"),
            &device.read_values(&y, tokens * dim)?,
            &want_y,
        ),
        compare(
            format!("embedding gradient {shape}"),
            &device.read_values(&dw, vocab * dim)?,
            &want_dw,
            tolerance(storage),
        ),
    ])
}
