//! The data directory's files as the operating system sees them: one owner (a lock), and
//! every secret or authority-bearing file private whatever the umask (issue 18).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use courier_testkit::spawn::{add_business, free_port, Files, Serve};

/// A wrapper that runs courier under `umask 000`: every mode bit the program asks for is
/// granted, so what ends up on disk is what courier chose.
fn courier_umask_000(dir: &Path) -> PathBuf {
    let path = dir.join("courier-umask-000");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\numask 000\nexec '{}' \"$@\"\n",
            super::courier_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    path
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file and directory under `root`, depth first.
fn walk(root: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            walk(&p, out);
        }
    }
}

#[test]
fn under_umask_000_every_secret_and_authority_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let bin = courier_umask_000(dir.path());

    // The master key, as the README makes it.
    let key = dir.path().join("master.key");
    let out = Command::new(&bin)
        .args(["keys", "init", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&key), 0o600, "master key");

    // The registry, written by the businesses command.
    let files = Files {
        data: dir.path().join("data"),
        registry: dir.path().join("registry.toml"),
        key_file: key,
    };
    add_business(&bin, &files.registry, "Acme", &["--tier", "2000"]);
    assert_eq!(mode(&files.registry), 0o600, "registry");

    // A server's first start creates the data directory and everything in it; an unpause
    // request lands in its control spool.
    let mut server = Serve::new(&bin, &files, free_port(), &dir.path().join("serve.log")).spawn();
    let out = Command::new(&bin)
        .args(["businesses", "unpause", "--id", "1", "--data-dir"])
        .arg(&files.data)
        .output()
        .unwrap();
    // The control thread writes its status file and checkpoints within about a second.
    std::thread::sleep(Duration::from_millis(2500));
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut all = vec![files.data.clone()];
    walk(&files.data, &mut all);
    let names: Vec<String> = all
        .iter()
        .map(|p| p.strip_prefix(&files.data).unwrap().display().to_string())
        .collect();
    for wanted in [
        "lock",
        "tls/key.der",
        "business-keys",
        "log/shard-0/keyring",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing: {names:?}"
        );
    }
    assert!(names.iter().any(|n| n.starts_with("detect/")), "{names:?}");
    for (p, name) in all.iter().zip(&names) {
        let m = mode(p);
        if p.is_dir() {
            assert_eq!(m, 0o700, "directory {name:?}");
        } else if name == "tls/cert.der" || name.ends_with(".seg") {
            // The certificate is public; segments are encrypted at rest and hold no key.
            assert_eq!(m & 0o022, 0, "{name:?} is writable by others: {m:o}");
        } else {
            assert_eq!(m, 0o600, "{name:?}");
        }
    }
}

#[test]
fn a_key_file_open_to_others_stops_start_up_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), &"ab".repeat(32));
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(super::courier_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&files.data)
        .arg("--master-key-file")
        .arg(&files.key_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mode 0644") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!files.data.join("log").exists(), "nothing started");

    // The same for the TLS key a first start wrote: fixed, the server starts; opened up
    // again, it refuses.
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = dir.path().join("serve.log");
    let mut server = Serve::new(super::courier_bin(), &files, free_port(), &log).spawn();
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    let tls_key = files.data.join("tls/key.der");
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut server = Serve::new(super::courier_bin(), &files, free_port(), &log).spawn_unready();
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let text = server.log_text();
    assert!(text.contains("key.der has mode 0640"), "{text}");
}

#[test]
fn a_second_server_on_one_data_directory_is_refused_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), &"cd".repeat(32));
    let mut first = Serve::new(
        super::courier_bin(),
        &files,
        free_port(),
        &dir.path().join("first.log"),
    )
    .spawn();
    let mut second = Serve::new(
        super::courier_bin(),
        &files,
        free_port(),
        &dir.path().join("second.log"),
    )
    .spawn_unready();
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let text = second.log_text();
    assert!(
        text.contains("another courier server is using this data directory"),
        "{text}"
    );
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the first still runs"
    );
    first.terminate();
    assert!(first.wait_exit(Duration::from_secs(30)).success());

    // A SIGKILLed owner leaves no stale lock: the next start takes it.
    let mut third = Serve::new(
        super::courier_bin(),
        &files,
        free_port(),
        &dir.path().join("third.log"),
    )
    .spawn();
    third.child.kill().unwrap();
    third.child.wait().unwrap();
    let mut fourth = Serve::new(
        super::courier_bin(),
        &files,
        free_port(),
        &dir.path().join("fourth.log"),
    )
    .spawn();
    fourth.terminate();
    assert!(fourth.wait_exit(Duration::from_secs(30)).success());
}
