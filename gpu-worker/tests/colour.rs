//! Colour against the references (issue 6, acceptance 2): on the 2048×2048 region at the
//! origin of level 0 of the real CMU slide, Mira's Otsu threshold, optical density, Macenko
//! stain vectors and normalised pixels against `skimage.filters.threshold_otsu` and
//! torchstain's numpy normalisers, run in CI on the very same bytes.

use std::path::PathBuf;
use std::process::Command;

use mira_gpu_worker::kernels::{cpu, Device};
use mira_gpu_worker::slide::Slide;
use mira_gpu_worker::stain::{self, Macenko, Normalizer, Reinhard};

const SIDE: u64 = 2048;

struct Reference {
    otsu: u8,
    he: [[f64; 2]; 3],
    max_c: [f64; 2],
    od: Vec<f64>,
    macenko: Vec<u8>,
    reinhard: Vec<u8>,
}

fn region() -> Vec<u8> {
    let dir = PathBuf::from(std::env::var("MIRA_TESTDATA").expect("MIRA_TESTDATA (scripts/bootstrap)"));
    let slide = Slide::open(&dir.join("CMU-1-Small-Region.svs")).unwrap();
    slide.read_rgb(0, 0, 0, SIDE, SIDE).unwrap()
}

fn reference(rgb: &[u8], sat: &[u8]) -> Reference {
    let dir = std::env::temp_dir().join(format!("mira-colour-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rgb"), rgb).unwrap();
    std::fs::write(dir.join("sat"), sat).unwrap();
    let python = std::env::var("MIRA_PYTHON").expect("MIRA_PYTHON (scripts/bootstrap) has numpy, skimage, torchstain");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/stain_reference.py");
    let join = |v: [f64; 3]| v.map(|x| x.to_string()).join(",");
    let o = Command::new(python)
        .args([
            script,
            dir.join("rgb").to_str().unwrap(),
            dir.join("sat").to_str().unwrap(),
        ])
        .args([SIDE.to_string(), SIDE.to_string()])
        .arg(&dir)
        .args([join(stain::REINHARD_TARGET_MEAN), join(stain::REINHARD_TARGET_STD)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let he: Vec<Vec<f64>> = serde_json::from_value(v["he"].clone()).unwrap();
    let max_c: Vec<f64> = serde_json::from_value(v["max_c"].clone()).unwrap();
    let od = std::fs::read(dir.join("od.f64"))
        .unwrap()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let r = Reference {
        otsu: v["otsu"].as_u64().unwrap() as u8,
        he: std::array::from_fn(|r| [he[r][0], he[r][1]]),
        max_c: [max_c[0], max_c[1]],
        od,
        macenko: std::fs::read(dir.join("macenko.u8")).unwrap(),
        reinhard: std::fs::read(dir.join("reinhard.u8")).unwrap(),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    r
}

fn cosine(a: impl Iterator<Item = f64> + Clone, b: impl Iterator<Item = f64> + Clone) -> f64 {
    let dot: f64 = a.clone().zip(b.clone()).map(|(x, y)| x * y).sum();
    let na: f64 = a.map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Fraction of values within `levels` of the reference, and the largest difference.
fn within(a: &[u8], b: &[u8], levels: u8) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let ok = a.iter().zip(b).filter(|(x, y)| x.abs_diff(**y) <= levels).count();
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    (ok as f64 / a.len() as f64, max)
}

/// Pixels (all three channels) within `levels`.
fn pixels_within(a: &[u8], b: &[u8], levels: u8) -> f64 {
    let ok = a
        .chunks_exact(3)
        .zip(b.chunks_exact(3))
        .filter(|(p, q)| p.iter().zip(q.iter()).all(|(x, y)| x.abs_diff(*y) <= levels))
        .count();
    ok as f64 / (a.len() / 3) as f64
}

#[test]
fn colour_matches_skimage_and_torchstain_on_the_cmu_region() {
    let device = Device::Cpu;
    let rgb = region();
    let sat = device.rgb_saturation(&rgb).unwrap();
    let reference = reference(&rgb, &sat);

    // Otsu: exactly skimage's threshold on the same 8-bit input.
    let otsu = device.otsu(&device.histogram256(&sat).unwrap()).unwrap();
    eprintln!("Otsu: mira {otsu}, skimage {}", reference.otsu);
    assert_eq!(otsu, reference.otsu);

    // Optical density of every pixel and channel.
    let table = cpu::od_table();
    let od = rgb.iter().map(|v| table[*v as usize] as f64);
    let c = cosine(od.clone(), reference.od.iter().copied());
    let worst = od.zip(&reference.od).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!("optical density: cosine {c:.9}, largest difference {worst:.2e}");
    assert!(c >= 0.999, "{c}");

    // Macenko's stain vectors and maximum concentrations.
    let fit = Macenko::fit(&device, &rgb).unwrap();
    for s in 0..2 {
        let c = cosine((0..3).map(|r| fit.he[r][s]), (0..3).map(|r| reference.he[r][s]));
        eprintln!(
            "stain {s}: mira {:?} torchstain {:?} cosine {c:.6}; max C {:.4} vs {:.4}",
            (0..3).map(|r| fit.he[r][s]).collect::<Vec<_>>(),
            (0..3).map(|r| reference.he[r][s]).collect::<Vec<_>>(),
            fit.max_c[s],
            reference.max_c[s]
        );
        assert!(c >= 0.999, "stain {s}: cosine {c}");
        assert!((fit.max_c[s] - reference.max_c[s]).abs() <= 0.01 * reference.max_c[s]);
    }

    // Normalised pixels within 2 levels on ≥ 99.9 % of pixels.
    let m = Normalizer::Macenko {
        m: fit.matrix().unwrap(),
        fit,
    };
    let mut ours = rgb.clone();
    m.apply(&device, &mut ours).unwrap();
    let share = pixels_within(&ours, &reference.macenko, 2);
    let (values, max) = within(&ours, &reference.macenko, 2);
    eprintln!(
        "Macenko: {:.4} % of pixels within 2 levels ({:.4} % of values), largest difference {max}",
        100.0 * share,
        100.0 * values
    );
    assert!(share >= 0.999, "{share}");

    // Reinhard to Mira's target, against torchstain given the same target.
    let fit = Reinhard::fit(&rgb).unwrap();
    let (k, d) = fit.coefficients();
    let r = Normalizer::Reinhard { k, d, fit };
    let mut ours = rgb.clone();
    r.apply(&device, &mut ours).unwrap();
    let share = pixels_within(&ours, &reference.reinhard, 2);
    let (_, max) = within(&ours, &reference.reinhard, 2);
    eprintln!(
        "Reinhard: {:.4} % of pixels within 2 levels, largest difference {max}",
        100.0 * share
    );
    assert!(share >= 0.999, "{share}");
}
