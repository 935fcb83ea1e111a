//! Every profile shipped in `tuning/` loads and validates.

use courier_pipeline::profile::Profile;

#[test]
fn every_tuning_profile_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("tuning/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable profile");
        if let Err(e) = Profile::from_toml(&text) {
            panic!("{}: {e}", path.display());
        }
        names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(
        names,
        ["default", "latency", "no-storage", "small", "throughput"],
        "the profiles ARCHITECTURE.md names"
    );
}
