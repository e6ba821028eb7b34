//! Running the real `vigil` binary as a separate process (the restart test, the load bench):
//! start it with a configuration file and learn from its log where it listens.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `program` (the `vigil` binary, possibly behind a wrapper such as `taskset`) with
/// `--config config` and the extra environment, and waits until it logs its address.
pub async fn start_vigil(
    mut program: Command,
    config: &Path,
    env: &[(&str, String)],
) -> (Child, SocketAddr) {
    program
        .arg("--config")
        .arg(config)
        .env("VIGIL_LOG", "vigil=info");
    for (key, value) in env {
        program.env(key, value);
    }
    let mut child = program
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("vigil starts");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("vigil's log") {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("an address");
            }
        }
        panic!("vigil exited before listening");
    })
    .await
    .expect("vigil listens within 30 s");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, address)
}
