//! The closed-loop driver against the test-only server (tests/common), on loopback.

use std::time::Duration;

use courier_client::ServerTrust;
use courier_loadgen::{self as load, LoadConfig, LoadError};
use courier_testkit::fake::{Options, TestServer, TOKEN};

fn config(server: &TestServer) -> LoadConfig {
    LoadConfig {
        target: server.addr,
        token: TOKEN.into(),
        trust: ServerTrust::Pinned(server.cert.clone()),
        connections: 2,
        batch: 8,
        size: 100,
        duration: Duration::from_millis(300),
        streams_per_connection: 2,
        batches_in_flight_per_stream: 4,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_run_accounts_for_every_message() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = TestServer::start(Options::default());
        let report = load::run(&config(&server)).await.unwrap();
        assert!(report.accepted > 0, "{report:?}");
        assert_eq!(report.sent % 8, 0);
        assert_eq!(
            report.sent,
            report.accepted + report.duplicate + report.throttled + report.rejected + report.errors
        );
        assert_eq!(report.errors, 0, "{report:?}");
        // Every accepted message reached the server once, with a unique client id.
        let positions = server.state.positions.lock().unwrap();
        assert_eq!(positions.len() as u64, report.accepted);
        assert!(report.duration_secs >= 0.3);
        let rate = report.accepted as f64 / report.duration_secs;
        assert!((report.msgs_per_sec - rate).abs() < 1e-6);
        assert!((report.payload_bytes_per_sec - rate * 100.0).abs() < 1e-3);
        let l = report.latency_us;
        assert!(l.p50 > 0 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999);
        assert!(l.p999 <= l.max);
    })
    .await
    .expect("test body timed out")
}

#[tokio::test]
async fn a_batch_over_the_servers_bounds_fails_before_the_run() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = TestServer::start(Options::default());
        let mut cfg = config(&server);
        cfg.batch = 65;
        let err = load::run(&cfg).await.unwrap_err();
        assert!(matches!(err, LoadError::BatchOutOfBounds(_)), "{err:?}");
        assert_eq!(server.state.submits(), 0);
    })
    .await
    .expect("test body timed out")
}

#[tokio::test]
async fn a_refused_token_is_a_connect_error() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = TestServer::start(Options::default());
        let mut cfg = config(&server);
        cfg.token = "c1.1.nope".into();
        let err = load::run(&cfg).await.unwrap_err();
        assert!(
            matches!(err, LoadError::Connect { index: 0, .. }),
            "{err:?}"
        );
    })
    .await
    .expect("test body timed out")
}
