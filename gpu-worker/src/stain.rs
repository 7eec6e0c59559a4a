//! Stain normalisation: Macenko (as torchstain's numpy normaliser, DESIGN §8) and Reinhard
//! (as torchstain's numpy Reinhard normaliser). Statistics are estimated once per slide, on
//! tissue pixels; the per-pixel work runs on the [`Device`].

use crate::kernels::{cpu, Device};

/// torchstain's reference H&E matrix (columns: hematoxylin, eosin; rows: R, G, B) and maximum
/// concentrations.
pub const HE_REF: [[f64; 2]; 3] = [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]];
pub const MAX_C_REF: [f64; 2] = [1.9705, 1.0308];
/// Macenko's α: the angle percentiles are α and 100 − α.
pub const ALPHA: f64 = 1.0;

/// Mira's Reinhard target: the CIELAB mean and standard deviation of the tissue of
/// `CMU-1-Small-Region.svs` (the H&E slide the tests use), as torchstain's `fit` computes them.
pub const REINHARD_TARGET_MEAN: [f64; 3] = [50.80, 27.18, -11.60];
pub const REINHARD_TARGET_STD: [f64; 3] = [21.35, 12.80, 8.51];

/// Why a slide's stains could not be fitted. Only a device failure is worth a retry: the slide's
/// colours will not change.
#[derive(Debug, thiserror::Error)]
pub enum StainError {
    #[error("too few stained pixels to estimate stain vectors ({0}; at least 100 are needed)")]
    TooFewPixels(u64),
    #[error("the stain vectors are degenerate (the slide's colours span no plane)")]
    Degenerate,
    #[error("too few tissue pixels for Reinhard statistics")]
    TooFewTissuePixels,
    #[error("the tissue has a single colour")]
    SingleColour,
    /// The device failed while fitting.
    #[error(transparent)]
    Device(#[from] anyhow::Error),
}

impl StainError {
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Device(_))
    }
}

/// Eigen-decomposition of a symmetric 3×3 matrix by Jacobi rotations: eigenvalues ascending,
/// eigenvectors as the columns of the returned matrix (as `numpy.linalg.eigh`, up to sign).
pub fn eigh3(a: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut a = a;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _ in 0..64 {
        let off = a[0][1].abs() + a[0][2].abs() + a[1][2].abs();
        if off < 1e-300 {
            break;
        }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            if a[p][q].abs() < 1e-300 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
            let t = if theta == 0.0 { 1.0 } else { t };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            for row in a.iter_mut() {
                let (akp, akq) = (row[p], row[q]);
                row[p] = c * akp - s * akq;
                row[q] = s * akp + c * akq;
            }
            let (rp, rq) = (a[p], a[q]);
            for k in 0..3 {
                a[p][k] = c * rp[k] - s * rq[k];
                a[q][k] = s * rp[k] + c * rq[k];
            }
            for row in v.iter_mut() {
                let (vp, vq) = (row[p], row[q]);
                row[p] = c * vp - s * vq;
                row[q] = s * vp + c * vq;
            }
        }
    }
    let mut order = [0, 1, 2];
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let values = order.map(|i| a[i][i]);
    let vectors = std::array::from_fn(|r| order.map(|i| v[r][i]));
    (values, vectors)
}

/// `numpy.percentile(x, q)` (linear interpolation between order statistics), read from a
/// histogram of `bins.len()` bins of `width` starting at `lo`: each order statistic is placed
/// inside its bin by rank.
pub fn percentile(bins: &[u64], lo: f64, width: f64, q: f64) -> f64 {
    let n: u64 = bins.iter().sum();
    if n == 0 {
        return f64::NAN;
    }
    let rank = q / 100.0 * (n - 1) as f64;
    let at = |k: u64| {
        let mut seen = 0u64;
        for (b, &c) in bins.iter().enumerate() {
            if c > 0 && seen + c > k {
                return lo + width * (b as f64 + ((k - seen) as f64 + 0.5) / c as f64);
            }
            seen += c;
        }
        lo + width * bins.len() as f64
    };
    let (f, c) = (rank.floor() as u64, rank.ceil() as u64);
    let (a, b) = (at(f), at(c));
    a + (b - a) * (rank - f as f64)
}

/// A slide's Macenko stain estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Macenko {
    /// Columns: hematoxylin, eosin; rows: R, G, B (unit vectors in OD space).
    pub he: [[f64; 2]; 3],
    /// 99th percentile of each stain's concentration.
    pub max_c: [f64; 2],
}

fn pinv(he: &[[f64; 2]; 3]) -> Option<[[f64; 3]; 2]> {
    // (HEᵀHE)⁻¹ HEᵀ: numpy's lstsq for a full-rank 3×2 system.
    let mut g = [[0.0; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            g[i][j] = (0..3).map(|r| he[r][i] * he[r][j]).sum();
        }
    }
    let det = g[0][0] * g[1][1] - g[0][1] * g[1][0];
    if det.abs() < 1e-12 {
        return None;
    }
    let inv = [[g[1][1] / det, -g[0][1] / det], [-g[1][0] / det, g[0][0] / det]];
    Some(std::array::from_fn(|i| {
        std::array::from_fn(|r| inv[i][0] * he[r][0] + inv[i][1] * he[r][1])
    }))
}

impl Macenko {
    /// Estimates the stain vectors and maximum concentrations of `rgb` (pixels of tissue).
    pub fn fit(device: &Device, rgb: &[u8]) -> Result<Self, StainError> {
        let sums = device.od_sums(rgb)?;
        if sums.n < 100 {
            return Err(StainError::TooFewPixels(sums.n));
        }
        let (_, vecs) = eigh3(sums.covariance());
        let e1 = [vecs[0][1], vecs[1][1], vecs[2][1]];
        let e2 = [vecs[0][2], vecs[1][2], vecs[2][2]];
        let hist = device.angle_histogram(rgb, e1.map(|v| v as f32), e2.map(|v| v as f32))?;
        let width = std::f64::consts::TAU / cpu::ANGLE_BINS as f64;
        let lo = -std::f64::consts::PI;
        let min_phi = percentile(&hist, lo, width, ALPHA);
        let max_phi = percentile(&hist, lo, width, 100.0 - ALPHA);
        let along = |phi: f64| -> [f64; 3] { std::array::from_fn(|r| e1[r] * phi.cos() + e2[r] * phi.sin()) };
        let (v_min, v_max) = (along(min_phi), along(max_phi));
        // torchstain's heuristic: hematoxylin first.
        let (h, e) = if v_min[0] > v_max[0] {
            (v_min, v_max)
        } else {
            (v_max, v_min)
        };
        let he: [[f64; 2]; 3] = std::array::from_fn(|r| [h[r], e[r]]);
        let p = pinv(&he).ok_or(StainError::Degenerate)?;
        let ch = device.concentration_histogram(rgb, p.map(|r| r.map(|v| v as f32)))?;
        let cw = (cpu::C_HI - cpu::C_LO) as f64 / cpu::CONC_BINS as f64;
        let max_c = [
            percentile(&ch[..cpu::CONC_BINS], cpu::C_LO as f64, cw, 99.0),
            percentile(&ch[cpu::CONC_BINS..], cpu::C_LO as f64, cw, 99.0),
        ];
        if !(max_c[0] > 0.0 && max_c[1] > 0.0) {
            return Err(StainError::Degenerate);
        }
        Ok(Self { he, max_c })
    }

    /// The per-pixel matrix: `OD' = HE_ref · diag(maxC_ref / maxC) · pinv(HE) · OD`.
    pub fn matrix(&self) -> Result<[[f32; 3]; 3], StainError> {
        let p = pinv(&self.he).ok_or(StainError::Degenerate)?;
        let scale = [MAX_C_REF[0] / self.max_c[0], MAX_C_REF[1] / self.max_c[1]];
        Ok(std::array::from_fn(|ch| {
            std::array::from_fn(|k| (0..2).map(|s| HE_REF[ch][s] * scale[s] * p[s][k]).sum::<f64>() as f32)
        }))
    }
}

/// A slide's Reinhard statistics: CIELAB mean and standard deviation of its tissue.
#[derive(Debug, Clone, PartialEq)]
pub struct Reinhard {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Reinhard {
    pub fn fit(rgb: &[u8]) -> Result<Self, StainError> {
        if rgb.len() < 300 {
            return Err(StainError::TooFewTissuePixels);
        }
        let (mean, std) = cpu::lab_mean_std(rgb);
        if !std.iter().all(|s| *s > 1e-6) {
            return Err(StainError::SingleColour);
        }
        Ok(Self { mean, std })
    }

    /// `(k, d)` with `x' = x · k + d` per LAB channel.
    pub fn coefficients(&self) -> ([f32; 3], [f32; 3]) {
        let k: [f64; 3] = std::array::from_fn(|i| REINHARD_TARGET_STD[i] / self.std[i]);
        let d = std::array::from_fn(|i| (REINHARD_TARGET_MEAN[i] - self.mean[i] * k[i]) as f32);
        (k.map(|v| v as f32), d)
    }
}

/// What a job asked for, fitted to one slide.
#[derive(Debug, Clone)]
pub enum Normalizer {
    Macenko { m: [[f32; 3]; 3], fit: Macenko },
    Reinhard { k: [f32; 3], d: [f32; 3], fit: Reinhard },
}

impl Normalizer {
    pub fn apply(&self, device: &Device, rgb: &mut [u8]) -> anyhow::Result<()> {
        match self {
            Self::Macenko { m, .. } => device.macenko_apply(rgb, *m),
            Self::Reinhard { k, d, .. } => device.reinhard_apply(rgb, *k, *d),
        }
    }

    pub fn describe(&self) -> serde_json::Value {
        match self {
            Self::Macenko { fit, .. } => serde_json::json!({
                "method": "macenko", "he": fit.he, "max_c": fit.max_c,
                "he_ref": HE_REF, "max_c_ref": MAX_C_REF, "io": cpu::IO, "beta": cpu::BETA, "alpha": ALPHA,
            }),
            Self::Reinhard { fit, .. } => serde_json::json!({
                "method": "reinhard", "mean": fit.mean, "std": fit.std,
                "target_mean": REINHARD_TARGET_MEAN, "target_std": REINHARD_TARGET_STD,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the slide's colours decide is final; only the device's failures are retried.
    #[test]
    fn a_slide_whose_stains_cannot_be_fitted_is_not_retried() {
        let grey = [128u8; 3 * 400];
        assert!(matches!(Reinhard::fit(&grey), Err(StainError::SingleColour)));
        assert!(matches!(
            Reinhard::fit(&grey[..30]),
            Err(StainError::TooFewTissuePixels)
        ));
        // Nearly white: no pixel is stained enough to count.
        assert!(matches!(
            Macenko::fit(&Device::Cpu, &[238u8; 3 * 400]),
            Err(StainError::TooFewPixels(_))
        ));
        for e in [
            StainError::SingleColour,
            StainError::TooFewTissuePixels,
            StainError::Degenerate,
        ] {
            assert!(!e.retryable(), "{e}");
        }
        assert!(StainError::Device(anyhow::anyhow!("out of device memory")).retryable());
    }

    #[test]
    fn eigh_recovers_a_rotated_diagonal() {
        let a = [[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]];
        let (vals, vecs) = eigh3(a);
        assert!(vals[0] <= vals[1] && vals[1] <= vals[2]);
        for k in 0..3 {
            for r in 0..3 {
                let av: f64 = (0..3).map(|c| a[r][c] * vecs[c][k]).sum();
                assert!((av - vals[k] * vecs[r][k]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn percentile_of_a_fine_histogram_is_numpys() {
        // Values 0..1000 in 1000 unit bins: numpy.percentile(range(1000), 1) = 9.99.
        let bins = vec![1u64; 1000];
        let p = percentile(&bins, 0.0, 1.0, 1.0);
        assert!((p - (9.99 + 0.5)).abs() < 1e-9, "{p}");
        assert!((percentile(&bins, 0.0, 1.0, 50.0) - 500.0).abs() < 1e-9);
    }
}
