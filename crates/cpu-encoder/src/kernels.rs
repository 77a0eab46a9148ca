//! Row kernels (layer norm, GELU, softmax) compiled for several SIMD levels and picked at
//! run time, so one portable binary still uses AVX-512 or AVX2 where the CPU has them.
//! Reductions keep 16 independent lanes so the compiler can vectorise them without
//! reassociating floating-point sums on its own.

use std::sync::LazyLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Baseline,
}

pub static SIMD: LazyLock<Simd> = LazyLock::new(detect);

fn detect() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("fma")
        {
            return Simd::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Simd::Avx2;
        }
    }
    Simd::Baseline
}

/// Defines `pub fn $name(...)` whose body is compiled three times (AVX-512, AVX2+FMA,
/// baseline) and dispatched on [`SIMD`].
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) { imp($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) { imp($($arg),*) }
            match *SIMD {
                // SAFETY: SIMD reports only features this CPU has.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => unsafe { v3($($arg),*) },
                _ => imp($($arg),*),
            }
        }
    };
}

const LANES: usize = 16;

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// e^x with ~2 ulp error over the f32 range (Cody-Waite reduction, degree-6 polynomial),
/// branch-free so loops over it vectorise. Inputs above 88.3 are clamped; below -87.3 the
/// result is exactly 0, never a denormal: masked attention scores land there, and
/// denormals reaching a matrix product slowed training steps by a fifth.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let t = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = r.mul_add(1.0 / 720.0, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    let exponent = (t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23;
    let e = p * f32::from_bits(exponent as u32);
    if underflow {
        0.0
    } else {
        e
    }
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / a.mul_add(0.327_591_1, 1.0);
    let p = t.mul_add(1.061_405_4, -1.453_152);
    let p = p.mul_add(t, 1.421_413_8);
    let p = p.mul_add(t, -0.284_496_74);
    let p = p.mul_add(t, 0.254_829_6);
    let y = 1.0 - p * t * exp(-a * a);
    y.copysign(x)
}

multiversion! {
    /// Each `bias.len()`-wide row of `x` becomes gelu(x + bias), the exact (erf) GELU
    /// BERT was trained with.
    pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                let u = *v + b;
                *v = 0.5 * u * (1.0 + erf(u * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

multiversion! {
    /// x <- tanh(x), from the exact identity tanh(x) = 1 - 2 / (e^{2x} + 1).
    pub fn tanh(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 1.0 - 2.0 / (exp(2.0 * *v) + 1.0);
        }
    }
}

multiversion! {
    /// Softmax over each `width`-long row of `x`, in place.
    pub fn softmax_rows(x: &mut [f32], width: usize) {
        for row in x.chunks_exact_mut(width) {
            let m = max(row);
            for v in row.iter_mut() {
                *v = exp(*v - m);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Each `gamma.len()`-wide row of `x` becomes LayerNorm(x + residual + bias).
    pub fn add_layer_norm(x: &mut [f32], residual: Option<&[f32]>, bias: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
        let width = gamma.len();
        for (r, row) in x.chunks_exact_mut(width).enumerate() {
            if let Some(res) = residual {
                for (v, a) in row.iter_mut().zip(&res[r * width..(r + 1) * width]) {
                    *v += a;
                }
            }
            if let Some(bias) = bias {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
            let mean = sum(row) / width as f32;
            let mut sq = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let mut tail = 0.0;
            for v in chunks.remainder() {
                tail += (v - mean) * (v - mean);
            }
            for c in chunks {
                for i in 0..LANES {
                    let d = c[i] - mean;
                    sq[i] += d * d;
                }
            }
            let var = (sq.iter().sum::<f32>() + tail) / width as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

// Backward passes, for training (src/model/ops.rs wraps them as candle ops).

multiversion! {
    /// x <- gelu(x), the exact (erf) GELU.
    pub fn gelu(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// grad <- grad * gelu'(x): Phi(x) + x phi(x).
    pub fn gelu_backward(x: &[f32], grad: &mut [f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (g, &u) in grad.iter_mut().zip(x) {
            let cdf = 0.5 * (1.0 + erf(u * std::f32::consts::FRAC_1_SQRT_2));
            *g *= u.mul_add(exp(-0.5 * u * u) * INV_SQRT_2PI, cdf);
        }
    }
}

multiversion! {
    /// Backward of y = softmax(scale * s + mask) over `width`-long rows: grad <- dL/ds,
    /// i.e. scale * y * (grad - <grad, y>).
    pub fn softmax_backward_rows(y: &[f32], grad: &mut [f32], width: usize, scale: f32) {
        for (yr, gr) in y.chunks_exact(width).zip(grad.chunks_exact_mut(width)) {
            let d = dot(yr, gr);
            for (g, &p) in gr.iter_mut().zip(yr) {
                *g = scale * p * (*g - d);
            }
        }
    }
}

multiversion! {
    /// Backward of y = LayerNorm(x) * gamma + beta over `gamma.len()`-wide rows: grad <- dL/dx,
    /// and dL/dgamma, dL/dbeta are added to `dgamma`, `dbeta`.
    pub fn layer_norm_backward(x: &[f32], grad: &mut [f32], gamma: &[f32], eps: f32, dgamma: &mut [f32], dbeta: &mut [f32]) {
        let width = gamma.len();
        let n = width as f32;
        for (xr, gr) in x.chunks_exact(width).zip(grad.chunks_exact_mut(width)) {
            let mean = sum(xr) / n;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            let (mut s1, mut s2) = (0.0f32, 0.0f32);
            for i in 0..width {
                let xhat = (xr[i] - mean) * inv;
                let g = gr[i];
                dgamma[i] += g * xhat;
                dbeta[i] += g;
                let d = g * gamma[i];
                s1 += d;
                s2 += d * xhat;
            }
            let (m1, m2) = (s1 / n, s2 / n);
            for i in 0..width {
                let xhat = (xr[i] - mean) * inv;
                gr[i] = inv * (gr[i] * gamma[i] - m1 - xhat * m2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_reference(x: f64) -> f64 {
        // Series for small |x|, good to 1e-12 on [-4, 4] with enough terms.
        let mut term = x;
        let mut total = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_matches_std() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn erf_and_gelu_match_reference() {
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 / 100.0).collect();
        for &x in &xs {
            let err = (erf(x) as f64 - erf_reference(x as f64)).abs();
            assert!(err < 5e-7, "erf({x}) off by {err}");
        }
        let mut g: Vec<f32> = xs.iter().map(|x| x - 0.25).collect();
        bias_gelu(&mut g, &[0.25]);
        for (&x, &y) in xs.iter().zip(&g) {
            let want = 0.5 * x as f64 * (1.0 + erf_reference(x as f64 / 2f64.sqrt()));
            assert!(
                (y as f64 - want).abs() < 1e-6,
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    #[test]
    fn softmax_and_layer_norm_match_scalar_code() {
        let mut x: Vec<f32> = (0..3 * 37)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let orig = x.clone();
        softmax_rows(&mut x, 37);
        for (row, src) in x.chunks(37).zip(orig.chunks(37)) {
            let m = src.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = src.iter().map(|v| (v - m).exp()).sum();
            for (p, s) in row.iter().zip(src) {
                assert!((p - (s - m).exp() / z).abs() < 1e-6);
            }
        }
        let (gamma, beta) = (vec![1.5f32; 37], vec![0.25f32; 37]);
        let mut y = orig.clone();
        let res = vec![1.0f32; y.len()];
        add_layer_norm(&mut y, Some(&res), Some(&[0.5; 37]), &gamma, &beta, 1e-12);
        for (row, src) in y.chunks(37).zip(orig.chunks(37)) {
            let s: Vec<f32> = src.iter().map(|v| v + 1.5).collect();
            let mean = s.iter().sum::<f32>() / 37.0;
            let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 37.0;
            for (got, v) in row.iter().zip(&s) {
                assert!((got - ((v - mean) / var.sqrt() * 1.5 + 0.25)).abs() < 1e-5);
            }
        }
        let mut t: Vec<f32> = (-50..50).map(|i| i as f32 / 10.0).collect();
        let src = t.clone();
        tanh(&mut t);
        for (a, b) in t.iter().zip(&src) {
            assert!((a - b.tanh()).abs() < 1e-6);
        }
    }
}
