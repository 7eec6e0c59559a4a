//! What a slide may declare (ADR 0023), on files as large as the lies: an honest pyramid of
//! 100,000 × 100,000 pixels (blank, so that it is quick to write) is opened, while a file
//! declaring the same size with one tile shared everywhere is refused, and
//! `Worker__MaxSlidePixels` still refuses the honest one when set below its size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mira_gpu_worker::slide::{Limits, Reader, Slide, SlideError};
use proptest::prelude::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mira-limits-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lying(dir: &Path) -> PathBuf {
    let python = std::env::var("MIRA_PYTHON").expect("MIRA_PYTHON names the tools' Python (scripts/bootstrap)");
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/lying_tiffs.py");
    let o = std::process::Command::new(python).arg(tool).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join("area_100k.tif")
}

#[test]
fn an_honest_slide_as_large_as_a_lying_one_is_opened_and_the_pixel_limit_still_holds() {
    let dir = scratch("big");
    let honest = dir.join("honest_100k.tif");
    let spec = format!(
        "{}[tile,pyramid,compression=jpeg,tile-width=256,tile-height=256]",
        honest.display()
    );
    let made = Instant::now();
    let o = std::process::Command::new("vips")
        .args(["black", &spec, "100000", "100000", "--bands", "3"])
        .output()
        .expect("vips is installed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::metadata(&honest).unwrap().len();
    eprintln!(
        "honest 100000 × 100000 pyramid: {} MiB ({} pixels a byte), written in {:?}",
        bytes >> 20,
        10_000_000_000 / bytes,
        made.elapsed()
    );
    let opened = Instant::now();
    let s = Slide::open_limited(&honest, Reader::Auto, &Limits::default()).unwrap();
    assert_eq!(s.dimensions(), (100_000, 100_000));
    eprintln!("opened and checked in {:?}", opened.elapsed());
    let err = Slide::open_limited(&lying(&dir), Reader::Auto, &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, SlideError::Implausible(why) if why.contains("pixels per byte")),
        "{err}"
    );
    let err = Slide::open_limited(
        &honest,
        Reader::Auto,
        &Limits {
            max_pixels: 5_000_000_000,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("it declares 100000 × 100000 pixels, more than Worker__MaxSlidePixels (5000000000)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A small honest pyramid (600 × 500, 256-pixel tiles), written once per test process.
fn small_pyramid() -> &'static Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = scratch("small");
        let tif = dir.join("small.tif");
        let spec = format!(
            "{}[tile,pyramid,compression=jpeg,tile-width=256,tile-height=256]",
            tif.display()
        );
        let o = std::process::Command::new("vips")
            .args(["black", &spec, "600", "500", "--bands", "3"])
            .output()
            .expect("vips is installed");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&tif).unwrap()
    })
}

proptest! {
    // 300 cases in CI; longer by hand: PROPTEST_CASES=100000.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300),
        ..ProptestConfig::default()
    })]

    /// The verifier (Mira's checks, then OpenSlide and libtiff) on a real pyramid with bytes of
    /// its header, directories and tables changed: it opens or refuses, and never crashes.
    #[test]
    fn the_verifier_opens_or_refuses_a_damaged_slide(changes in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut bytes = small_pyramid().clone();
        let n = bytes.len();
        for (at, to) in changes {
            bytes[at % n] = to;
        }
        let dir = std::env::temp_dir().join(format!("mira-fuzz-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("damaged.tif");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(s) = Slide::open_limited(&path, Reader::Auto, &Limits::default()) {
            let _ = s.metadata();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
