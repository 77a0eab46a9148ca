//! Training kernels: layer norm, masked softmax and GELU as single candle ops with
//! hand-written backward passes. Composed from candle primitives, each was 5-20 tensor
//! passes forward and as many backward, which made elementwise work, not matrix products,
//! most of a training step. The row kernels are the fast encoder's (SIMD, picked at run
//! time); rows are split across the rayon pool.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use dealsift_cpu_encoder::kernels;
use rayon::prelude::*;

/// Rows per parallel task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

/// The f32 elements of a contiguous storage.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expects f32, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    }
}

fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `x * Phi(x)`, the exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "dealsift-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = slice(storage, layout, self.name())?.to_vec();
        out.par_chunks_mut(ROWS_PER_TASK * 256).for_each(kernels::gelu);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = host_vec(arg)?;
        let mut g = host_vec(grad)?;
        g.par_chunks_mut(ROWS_PER_TASK * 256).zip(x.par_chunks(ROWS_PER_TASK * 256)).for_each(|(g, x)| kernels::gelu_backward(x, g));
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// `softmax(scores * scale + mask)` over the last dimension. `scores` is
/// (batch, heads, queries, keys); `mask` is additive, (batch, 1, 1, keys).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(&mask.contiguous()?, MaskedSoftmax { scale: scale as f32 })
}

struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "dealsift-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let scores = slice(s1, l1, self.name())?;
        let mask = slice(s2, l2, self.name())?;
        let (batch, heads, queries, keys) = l1.shape().dims4()?;
        if mask.len() != batch * keys {
            candle_core::bail!("{}: mask {:?} does not fit scores {:?}", self.name(), l2.shape(), l1.shape());
        }
        let rows_per_batch = heads * queries;
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(keys * ROWS_PER_TASK).enumerate().for_each(|(task, chunk)| {
            let first_row = task * ROWS_PER_TASK;
            for (r, row) in chunk.chunks_exact_mut(keys).enumerate() {
                let row_index = first_row + r;
                let m = &mask[(row_index / rows_per_batch) * keys..][..keys];
                let s = &scores[row_index * keys..][..keys];
                for ((o, &v), &mv) in row.iter_mut().zip(s).zip(m) {
                    *o = v * self.scale + mv;
                }
            }
            kernels::softmax_rows(chunk, keys);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, scores: &Tensor, _mask: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let keys = scores.dim(candle_core::D::Minus1)?;
        let y = host_vec(res)?;
        let mut g = host_vec(grad)?;
        let task = keys * ROWS_PER_TASK;
        g.par_chunks_mut(task).zip(y.par_chunks(task)).for_each(|(g, y)| kernels::softmax_backward_rows(y, g, keys, self.scale));
        Ok((Some(Tensor::from_vec(g, scores.shape(), scores.device())?), None))
    }
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(gamma, beta, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "dealsift-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let gamma = slice(s2, l2, self.name())?;
        let beta = slice(s3, l3, self.name())?;
        let width = l1.shape().dims().last().copied().unwrap_or(0);
        if gamma.len() != width || beta.len() != width {
            candle_core::bail!("{}: gamma {:?} / beta {:?} do not fit x {:?}", self.name(), l2.shape(), l3.shape(), l1.shape());
        }
        let mut out = x.to_vec();
        out.par_chunks_mut(width * ROWS_PER_TASK).for_each(|rows| kernels::add_layer_norm(rows, None, None, gamma, beta, self.eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = gamma.elem_count();
        let xs = host_vec(x)?;
        let gammas = host_vec(gamma)?;
        let mut g = host_vec(grad)?;
        let task = width * ROWS_PER_TASK;
        // Per-task partial sums, added in task order: the same bits on every run (rayon's
        // `reduce` would associate them differently from run to run).
        let partials: Vec<(Vec<f32>, Vec<f32>)> = g
            .par_chunks_mut(task)
            .zip(xs.par_chunks(task))
            .map(|(g, x)| {
                let (mut dgamma, mut dbeta) = (vec![0f32; width], vec![0f32; width]);
                kernels::layer_norm_backward(x, g, &gammas, self.eps, &mut dgamma, &mut dbeta);
                (dgamma, dbeta)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![0f32; width], vec![0f32; width]);
        for (pg, pb) in &partials {
            dgamma.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
            dbeta.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        Ok((
            Some(Tensor::from_vec(g, x.shape(), x.device())?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), gamma.device())?),
            Some(Tensor::from_vec(dbeta, beta.shape(), beta.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    //! Each op against the same function composed from candle primitives (whose backward
    //! candle derives): values and gradients.
    use candle_core::{Device, Var, D};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Values and input gradients of `fast` and `reference` under the loss sum(f(x) * w).
    fn compare(x: &Tensor, fast: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor, tol: f32) {
        let w = random(x.dims(), 99);
        let (xa, xb) = (Var::from_tensor(x).unwrap(), Var::from_tensor(x).unwrap());
        let (ya, yb) = (fast(xa.as_tensor()), reference(xb.as_tensor()));
        assert!(max_diff(&ya, &yb) < tol, "values differ by {}", max_diff(&ya, &yb));
        let ga = (ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (da, db) = (ga.get(xa.as_tensor()).unwrap(), gb.get(xb.as_tensor()).unwrap());
        assert!(max_diff(da, db) < tol, "gradients differ by {}", max_diff(da, db));
    }

    #[test]
    fn gelu_matches_candle() {
        compare(&random(&[3, 70, 37], 1), |x| gelu(x).unwrap(), |x| x.gelu_erf().unwrap(), 1e-5);
    }

    #[test]
    fn masked_softmax_matches_candle() {
        let (b, h, s) = (3, 2, 70);
        let mut mask = vec![0f32; b * s];
        // Padding at the end of the first two sequences.
        for m in mask[s - 5..s].iter_mut() {
            *m = -1e9;
        }
        for m in mask[2 * s - 30..2 * s].iter_mut() {
            *m = -1e9;
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), &Device::Cpu).unwrap();
        let scale = 0.125;
        compare(
            &random(&[b, h, s, s], 2),
            |x| masked_softmax(x, &mask, scale).unwrap(),
            |x| candle_nn::ops::softmax(&(x * scale).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn layer_norm_matches_candle_with_parameter_gradients() {
        let x = random(&[2, 90, 48], 3);
        let gamma = Var::from_tensor(&(random(&[48], 4) + 1.0).unwrap()).unwrap();
        let beta = Var::from_tensor(&random(&[48], 5)).unwrap();
        let reference = |x: &Tensor| {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let centered = x.broadcast_sub(&mean).unwrap();
            let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let normed = centered.broadcast_div(&(var + 1e-12).unwrap().sqrt().unwrap()).unwrap();
            normed.broadcast_mul(gamma.as_tensor()).unwrap().broadcast_add(beta.as_tensor()).unwrap()
        };
        compare(&x, |x| layer_norm(x, gamma.as_tensor(), beta.as_tensor(), 1e-12).unwrap(), reference, 1e-4);

        let w = random(x.dims(), 6);
        let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let fast = loss(layer_norm(&x, gamma.as_tensor(), beta.as_tensor(), 1e-12).unwrap());
        let slow = loss(reference(&x));
        for p in [&gamma, &beta] {
            let d = max_diff(fast.get(p.as_tensor()).unwrap(), slow.get(p.as_tensor()).unwrap());
            assert!(d < 1e-3, "parameter gradient differs by {d}");
        }
    }
}
