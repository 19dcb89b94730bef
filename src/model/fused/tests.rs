//! Tests of the fused kernels against their composed references.
use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_var(shape: &[usize], seed: u64) -> Var {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn every_simd_level_computes_the_same_kernels() {
    use crate::model::simd::Level;
    // Odd lengths so the vector loops' remainders run too.
    let (h, n) = (37, 3);
    let x = rand_vec(n * h, 1);
    let w = rand_vec(h, 2);
    let g = rand_vec(n * h, 3);
    let mut mask = vec![0f32; h];
    mask[h - 5..].fill(f32::NEG_INFINITY); // a causal-style masked tail
    let at = |l: Level| {
        let mut out: Vec<f32> = Vec::new();
        let mut y = vec![0f32; n * h];
        rms_norm_rows_at(l, &x, &w, 1e-6, &mut y);
        out.extend(&y);
        let (mut dx, mut dw, mut gw) = (vec![0f32; n * h], vec![0f32; h], vec![0f32; h]);
        rms_norm_bwd_rows_at(l, &x, &g, &w, 1e-6, &mut dx, &mut dw, &mut gw);
        out.extend(&dx);
        out.extend(&dw);
        let mut p = x[..h].to_vec();
        softmax_row_at(l, &mut p, &mask, 0.7);
        out.extend(&p);
        let mut d = g[..h].to_vec();
        softmax_grad_row_at(l, &mut d, &p, 0.7);
        out.extend(&d);
        let mut y = vec![0f32; n * h];
        swiglu_fwd_at(l, &x, &g, &mut y);
        out.extend(&y);
        let (mut da, mut du) = (vec![0f32; n * h], vec![0f32; n * h]);
        swiglu_bwd_at(l, &x, &g, &w.repeat(n), &mut da, &mut du);
        out.extend(&da);
        out.extend(&du);
        let mut r = vec![0f32; 36];
        rotate_at(l, &x[..36], &w[..18], &g[..18], -1.0, &mut r);
        out.extend(&r);
        out
    };
    let base = at(Level::Baseline);
    assert!(base.iter().all(|v| v.is_finite()));
    // The masked tail of the softmax row is exactly zero.
    let p0 = 2 * n * h + h;
    assert!(base[p0 + h - 5..p0 + h].iter().all(|&v| v == 0.0));
    for l in Level::available() {
        // FMA contraction changes the last bits only.
        assert_close(&at(l), &base, 1e-5, &format!("{l:?}"));
    }
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Values and gradients (of Σ out ⊙ R for a random R) of `fused` against `composed`,
/// relative to the largest magnitude, for every input in `wrt`.
fn check(
    fused: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[Var],
    wrt: &[usize],
    tol: f32,
) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let yf = fused(&ts);
    let yc = composed(&ts);
    let scale = max_abs(&yc).max(1.0);
    assert!(
        max_abs_diff(&yf, &yc) <= tol * scale,
        "values differ by {} (scale {scale})",
        max_abs_diff(&yf, &yc)
    );
    let r = rand_var(yf.dims(), 99);
    let gf = (&yf * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (&yc * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for &i in wrt {
        let a = gf.get(&ts[i]).expect("fused gradient missing");
        let b = gc.get(&ts[i]).expect("composed gradient missing");
        let scale = max_abs(b).max(1.0);
        let d = max_abs_diff(a, b);
        assert!(
            d <= tol * scale,
            "gradient of input {i} differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn fast_exp_is_accurate_over_its_range() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 10.0 {
        let r = (x as f64).exp();
        let rel = ((fast_exp(x) as f64 - r) / r).abs();
        worst = worst.max(rel);
        x += 0.0137;
    }
    assert!(worst < 1e-6, "worst relative error {worst}");
    assert_eq!(fast_exp(0.0), 1.0);
    assert_eq!(fast_exp(-1e4), 0.0);
    assert_eq!(fast_exp(-87.5), 0.0);
}

#[test]
fn rms_norm_matches_composed_values_and_gradients() {
    // H = 13 exercises the dot-product remainder; 3000 rows span several rayon tasks, so
    // the ∂w partial sums are combined.
    for (rows, h) in [(1usize, 8usize), (7, 13), (3000, 24)] {
        let x = rand_var(&[rows, h], 1);
        let w = rand_var(&[h], 2);
        check(
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| rms_norm_composed(&t[0], &t[1], 1e-5).unwrap(),
            &[x, w],
            &[0, 1],
            2e-5,
        );
    }
}

#[test]
fn rms_norm_of_a_hand_computed_row() {
    // x = [3, 4], w = [1, 2], eps = 0: mean(x²) = 12.5, r = 1/√12.5 = 0.282843;
    // y = [3r, 8r] = [0.848528, 2.262742].
    let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let y: Vec<Vec<f32>> = rms_norm(&x, &w, 0.0).unwrap().to_vec2().unwrap();
    assert!((y[0][0] - 0.848528).abs() < 1e-5 && (y[0][1] - 2.262742).abs() < 1e-5);
}

#[test]
fn rope_matches_composed_including_non_contiguous_input() {
    let (b, nh, t, d) = (2usize, 3usize, 5usize, 8usize);
    let cos = rand_var(&[b, t, d / 2], 3);
    let sin = rand_var(&[b, t, d / 2], 4);
    let x = rand_var(&[b, nh, t, d], 5);
    check(
        |ts| rope(&ts[0], &ts[1], &ts[2]).unwrap(),
        |ts| rope_composed(&ts[0], &ts[1], &ts[2]).unwrap(),
        &[x, cos.clone(), sin.clone()],
        &[0],
        1e-5,
    );
    // The model rotates a transposed (b, t, h, d) → (b, h, t, d) view.
    let xt = rand_var(&[b, t, nh, d], 6);
    check(
        |ts| rope(&ts[0].transpose(1, 2).unwrap(), &ts[1], &ts[2]).unwrap(),
        |ts| rope_composed(&ts[0].transpose(1, 2).unwrap(), &ts[1], &ts[2]).unwrap(),
        &[xt, cos, sin],
        &[0],
        1e-5,
    );
}

#[test]
fn rope_by_a_quarter_turn_rotates_pairs() {
    // cos = 0, sin = 1: (x₁, x₂) → (−x₂, x₁); x = [1, 2, 3, 4] pairs (1,3), (2,4).
    let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 1, 4))
        .unwrap();
    let cos = Tensor::zeros((1, 1, 2), DType::F32, &Device::Cpu).unwrap();
    let sin = Tensor::ones((1, 1, 2), DType::F32, &Device::Cpu).unwrap();
    let y: Vec<f32> = rope(&x, &cos, &sin)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(y, vec![-3.0, -4.0, 1.0, 2.0]);
}

#[test]
fn masked_softmax_matches_composed_and_ignores_masked_keys() {
    let (b, nh, t, s) = (2usize, 3usize, 4usize, 6usize);
    let z = rand_var(&[b, nh, t, s], 7);
    let valid: Vec<Vec<bool>> = (0..b)
        .map(|bi| (0..s).map(|j| !(bi == 1 && j == 0)).collect())
        .collect();
    let mask = crate::model::attention_mask(&valid, s - t, t, &Device::Cpu).unwrap();
    let mvar = Var::from_tensor(&mask).unwrap();
    check(
        |ts| masked_softmax(&ts[0], &ts[1], 0.35).unwrap(),
        |ts| masked_softmax_composed(&ts[0], &ts[1], 0.35).unwrap(),
        &[z.clone(), mvar],
        &[0],
        1e-5,
    );
    // Sequence 1's padding key 0 gets no weight; future keys get none either.
    let yv = masked_softmax(z.as_tensor(), &mask, 0.35)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let at = |bi: usize, h: usize, ti: usize, j: usize| yv[((bi * nh + h) * t + ti) * s + j];
    assert_eq!(at(1, 2, 0, 0), 0.0);
    assert_eq!(at(0, 1, 0, s - t + 1), 0.0);
    let row: f32 = (0..s).map(|j| at(0, 0, 2, j)).sum();
    assert!((row - 1.0).abs() < 1e-6);
}

#[test]
fn swiglu_matches_composed_values_and_gradients() {
    for shape in [vec![1usize], vec![4, 7], vec![70, 300]] {
        let a = rand_var(&shape, 8);
        let u = rand_var(&shape, 9);
        check(
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| swiglu_composed(&t[0], &t[1]).unwrap(),
            &[a, u],
            &[0, 1],
            1e-5,
        );
    }
}

#[test]
fn gate_up_swiglu_matches_composed_values_and_gradients() {
    // One row (n = 1), odd sizes, and enough rows for several parallel tasks.
    // One row takes the decoding path (linear + swiglu); 17, 21 and 384 rows the fused node.
    for (lead, hidden, inter) in [
        (vec![1usize], 8usize, 5usize),
        (vec![3, 7], 13, 29),
        (vec![17], 13, 29),
        (vec![4, 96], 24, 200),
    ] {
        let mut xs = lead.clone();
        xs.push(hidden);
        let x = rand_var(&xs, 21);
        let wg = rand_var(&[inter, hidden], 22);
        let wu = rand_var(&[inter, hidden], 23);
        check(
            |t| gate_up_swiglu(&t[0], &t[1], &t[2]).unwrap(),
            |t| gate_up_swiglu_composed(&t[0], &t[1], &t[2]).unwrap(),
            &[x, wg, wu],
            &[0, 1, 2],
            1e-5,
        );
    }
}

#[test]
fn gate_up_swiglu_of_hand_computed_values() {
    // x = [1, 2]; w_gate rows [1, 0], [0, 1] → g = [1, 2]; w_up rows [1, 1], [0.5, 0]
    // → u = [3, 0.5]. y = silu(g)·u = [σ(1)·3, 2σ(2)·0.5] = [2.193176, 0.880797].
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1f32, 2.0]], &dev).unwrap();
    let wg = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
    let wu = Tensor::new(&[[1f32, 1.0], [0.5, 0.0]], &dev).unwrap();
    let y: Vec<Vec<f32>> = gate_up_swiglu(&x, &wg, &wu).unwrap().to_vec2().unwrap();
    assert!((y[0][0] - 2.193176).abs() < 1e-5, "{y:?}");
    assert!((y[0][1] - 0.880797).abs() < 1e-5, "{y:?}");
}

#[test]
fn swiglu_of_hand_computed_values() {
    // silu(0)·5 = 0; silu(2)·1 = 2·σ(2) = 2 / (1 + e⁻²) = 1.761594.
    let a = Tensor::new(&[0f32, 2.0], &Device::Cpu).unwrap();
    let u = Tensor::new(&[5f32, 1.0], &Device::Cpu).unwrap();
    let y: Vec<f32> = swiglu(&a, &u).unwrap().to_vec1().unwrap();
    assert_eq!(y[0], 0.0);
    assert!((y[1] - 1.761594).abs() < 1e-5);
}

#[test]
fn linear_matches_composed_values_and_gradients() {
    // A 3-D input (the model's (b, t, hidden)), a 2-D one, and odd sizes for the GEMM's
    // edge kernels.
    // Up to SKINNY_ROWS rows take the dot-product path, more the GEMM: both are covered.
    for (xs, out_f) in [
        (vec![2usize, 5, 16], 24usize),
        (vec![7, 13], 3),
        (vec![1, 1, 9], 1),
        (vec![3, 40, 33], 70),
        (vec![17, 8], 1000),
    ] {
        let in_f = *xs.last().unwrap();
        let x = rand_var(&xs, 10);
        let w = rand_var(&[out_f, in_f], 11);
        check(
            |t| linear(&t[0], &t[1]).unwrap(),
            |t| linear_composed(&t[0], &t[1]).unwrap(),
            &[x, w],
            &[0, 1],
            1e-5,
        );
    }
}

#[test]
fn linear_of_hand_computed_values() {
    // x = [[1, 2]], w = [[3, 4], [5, 6], [0, -1]]: y = [1·3 + 2·4, 1·5 + 2·6, −2] = [11, 17, −2].
    // With R = ones: ∂x = Σ_rows w = [8, 9]; ∂w = every row x = [1, 2].
    let x = Var::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
    let w = Var::new(&[[3f32, 4.0], [5.0, 6.0], [0.0, -1.0]], &Device::Cpu).unwrap();
    let y = linear(x.as_tensor(), w.as_tensor()).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![11.0, 17.0, -2.0]]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let dx: Vec<Vec<f32>> = g.get(x.as_tensor()).unwrap().to_vec2().unwrap();
    let dw: Vec<Vec<f32>> = g.get(w.as_tensor()).unwrap().to_vec2().unwrap();
    assert_eq!(dx, vec![vec![8.0, 9.0]]);
    assert_eq!(dw, vec![vec![1.0, 2.0]; 3]);
}

#[test]
fn attention_matches_composed_values_and_gradients() {
    // GQA (4 query heads on 2 KV heads) with a left-padded sequence, plain multi-head, and
    // one sequence with one KV head (fewer tasks than threads: the GEMMs go parallel).
    for (b, t, nh, nkv, hd) in [
        (2usize, 5usize, 4usize, 2usize, 8usize),
        (3, 4, 2, 2, 6),
        (1, 7, 3, 1, 4),
    ] {
        let q = rand_var(&[b, t, nh * hd], 20);
        let k = rand_var(&[b, t, nkv * hd], 21);
        let v = rand_var(&[b, t, nkv * hd], 22);
        let cos = rand_var(&[b, t, hd / 2], 23);
        let sin = rand_var(&[b, t, hd / 2], 24);
        let valid: Vec<Vec<bool>> = (0..b)
            .map(|bi| (0..t).map(|j| !(bi == 1 && j < 2)).collect())
            .collect();
        let mask = crate::model::attention_mask(&valid, 0, t, &Device::Cpu).unwrap();
        let mask = Var::from_tensor(&mask).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        // P kept from the forward, and recomputed in the backward (budget 0).
        for budget in [ATTN_KEEP_P_MAX_BYTES, 0] {
            check(
                |ts| {
                    attention_with_budget(
                        &ts[0], &ts[1], &ts[2], &ts[3], &ts[4], &ts[5], nh, nkv, scale, budget,
                    )
                    .unwrap()
                },
                |ts| {
                    attention_composed(
                        &ts[0], &ts[1], &ts[2], &ts[3], &ts[4], &ts[5], nh, nkv, scale,
                    )
                    .unwrap()
                },
                &[
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    cos.clone(),
                    sin.clone(),
                    mask.clone(),
                ],
                &[0, 1, 2],
                2e-5,
            );
        }
    }
}

#[test]
fn recomputed_attention_probabilities_give_the_same_gradients_bit_for_bit() {
    let (b, t, nh, nkv, hd) = (2usize, 9usize, 4usize, 2usize, 8usize);
    let ins: Vec<Var> = [nh * hd, nkv * hd, nkv * hd]
        .iter()
        .enumerate()
        .map(|(i, &w)| rand_var(&[b, t, w], 40 + i as u64))
        .collect();
    let cos = rand_var(&[b, t, hd / 2], 44);
    let sin = rand_var(&[b, t, hd / 2], 45);
    let mask = crate::model::attention_mask(&vec![vec![true; t]; b], 0, t, &Device::Cpu).unwrap();
    let r = rand_var(&[b, t, nh * hd], 46);
    let grads = |budget: usize| -> Vec<Vec<f32>> {
        let y = attention_with_budget(
            ins[0].as_tensor(),
            ins[1].as_tensor(),
            ins[2].as_tensor(),
            cos.as_tensor(),
            sin.as_tensor(),
            &mask,
            nh,
            nkv,
            0.35,
            budget,
        )
        .unwrap();
        let g = (y * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        ins.iter()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    };
    // The backward repeats the forward's GEMM and softmax, so the results are identical.
    assert_eq!(grads(usize::MAX), grads(0));
}

#[test]
fn attention_of_hand_computed_values() {
    // One head, hd = 2, no rotation (cos 1, sin 0), t = 2, scale 1.
    // q = [[1, 0], [0, 1]], k = [[1, 0], [1, 1]], v = [[1, 2], [3, 4]].
    // Row 0 sees key 0 only: y₀ = v₀ = [1, 2].
    // Row 1: scores q₁·k = [0, 1], p = [1/(1+e), e/(1+e)] = [0.268941, 0.731059];
    // y₁ = 0.268941·[1, 2] + 0.731059·[3, 4] = [2.462117, 3.462117].
    let dev = Device::Cpu;
    let q = Tensor::new(&[[[1f32, 0.0], [0.0, 1.0]]], &dev).unwrap();
    let k = Tensor::new(&[[[1f32, 0.0], [1.0, 1.0]]], &dev).unwrap();
    let v = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]]], &dev).unwrap();
    let cos = Tensor::ones((1, 2, 1), DType::F32, &dev).unwrap();
    let sin = Tensor::zeros((1, 2, 1), DType::F32, &dev).unwrap();
    let mask = crate::model::attention_mask(&[vec![true, true]], 0, 2, &dev).unwrap();
    let y: Vec<f32> = attention(&q, &k, &v, &cos, &sin, &mask, 1, 1, 1.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = [1.0, 2.0, 2.462117, 3.462117];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{y:?} vs {want:?}");
    }
}

#[test]
fn linear_bias_matches_composed_values_and_gradients() {
    // Skinny (≤ 16 rows) and GEMM paths, 3-D and 2-D inputs.
    for (xs, out_f) in [
        (vec![2usize, 5, 16], 24usize),
        (vec![3, 40, 33], 70),
        (vec![1, 7], 1),
    ] {
        let in_f = *xs.last().unwrap();
        let x = rand_var(&xs, 13);
        let w = rand_var(&[out_f, in_f], 14);
        let b = rand_var(&[out_f], 15);
        check(
            |t| linear_bias(&t[0], &t[1], &t[2]).unwrap(),
            |t| {
                linear_composed(&t[0], &t[1])
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            &[x, w, b],
            &[0, 1, 2],
            1e-5,
        );
    }
    // x = [[1, 2], [3, 4]], w = [[1, 0]], b = [10]: y = [[11], [13]]; with R = ones,
    // ∂b = number of rows = 2.
    let x = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let w = Var::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
    let b = Var::new(&[10f32], &Device::Cpu).unwrap();
    let y = linear_bias(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![11.0], vec![13.0]]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let db: Vec<f32> = g.get(b.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(db, vec![2.0]);
}
