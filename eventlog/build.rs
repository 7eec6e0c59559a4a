//! Embeds every migration in `../migrations` (`NNNN_name.sql`, numbered from 1 without gaps):
//! a new migration is its file alone. A file that does not fit the pattern, or a gap or a
//! repeat in the numbers, fails the build and names the file.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    // Read when the script runs, not when it was compiled: clones of the workspace share one
    // target directory (and so this script's binary), each with its own migrations.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("../migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut found: Vec<(i64, String, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a readable directory entry").path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_owned();
        let Some(stem) = file.strip_suffix(".sql") else {
            panic!("migrations/{file}: only NNNN_name.sql files belong in migrations/");
        };
        let (number, name) = stem
            .split_once('_')
            .filter(|(n, name)| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty())
            .unwrap_or_else(|| panic!("migrations/{file}: a migration is named NNNN_name.sql"));
        found.push((
            number.parse().expect("four digits"),
            name.to_owned(),
            path.canonicalize().expect("a path"),
        ));
    }
    found.sort();
    let mut out = String::from("&[\n");
    for (i, (version, name, path)) in found.iter().enumerate() {
        assert_eq!(
            *version,
            i as i64 + 1,
            "migrations/: migration {version}_{name} does not follow {} (numbers run from 1 without gaps or repeats)",
            i
        );
        writeln!(
            out,
            "    ({version}, {name:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .expect("a string");
    }
    out.push(']');
    let target = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("migrations.rs");
    std::fs::write(&target, out).expect("the generated table");
}
