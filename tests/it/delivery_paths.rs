//! Delivery's slower paths, one at a time, with an edge the test drives by hand:
//! retransmission after `retry_later` waits for the recipient (ONLINE brings it within a
//! second, long before the backoff would), a message past its time to live becomes
//! `expired` at its business, full delivery bounds hold a sender back while the edge
//! drains them (and throttle it after the hold), a device's forged one-time prekeys are
//! never used (its message is sealed to its signed prekey and still opens), and wire v1
//! clients keep working beside it all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::serve::Running;
use courier_client::edge::DeliveryEdge;

use super::delivery_kit::{device_world, DeviceEdge};
use courier_client::{Client, Deliveries, EdgeItem, EventReceiver, OutgoingMessage};
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::delivery::{
    BusinessEvent, Deliver, DeviceKeysEntry, Outcome, OutcomeEntry, StatusKind,
};
use courier_pipeline::wire::{Recipient, Status};
use courier_testkit::server::{self, client_config, Setup};

/// The backoff after `retry_later`: long, so that only ONLINE can bring a message back
/// within the test's bounds.
const BACKOFF_MS: u32 = 60_000;

fn start(dir: &std::path::Path) -> (Running, String, String) {
    start_with(dir, |_| {})
}

/// [`start`] with the profile changed by `tune` first.
fn start_with(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut courier_pipeline::profile::Profile),
) -> (Running, String, String) {
    let mut registry = Registry::default();
    let business = server::add_exempt(&mut registry, "shop", &[3u8; 32]);
    let (id, edge) = registry
        .add("edge", Tier::Unlimited, 1_000, &[4u8; 32])
        .unwrap();
    registry.set_platform(id, true);
    let mut setup = Setup::new(2, registry);
    setup.profile.delivery.retry_backoff_min_ms = BACKOFF_MS;
    setup.profile.delivery.retry_backoff_max_ms = BACKOFF_MS;
    tune(&mut setup.profile);
    (server::start(dir, setup), business, edge)
}

/// An edge that never publishes device keys: the relay asks (KEYS_WANTED) and waits
/// `e2e.device_key_wait_ms`, then the message fails `no_device_key` at its business,
/// after no `sent` (it was never handed over). Then the keys come for another recipient,
/// and its message is delivered sealed for its devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_without_device_keys_fails_no_device_key_after_the_wait() {
    use courier_client::EdgeItem;
    use courier_pipeline::wire::delivery::FailReason;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (running, business, edge_token) = start_with(dir.path(), |p| {
            p.delivery.e2e.device_key_wait_ms = 1_500;
            p.delivery.e2e.keys_wanted_retry_ms = 200;
        });
        let (client, mut events, edge, mut items) =
            connect_business_and_edge(&running, &business, &edge_token).await;
        let to = Recipient::parse(b"+4915112340009").unwrap();
        // The wait is kept on the relay's wall clock (unix ms, like every delivery
        // deadline), so it is checked against the same clock: the status's own time.
        let sent_at = Instant::now();
        let sent_unix_ms = super::retention::now_ms();
        client.submit(vec![message(9, to.as_str())]).await.unwrap();
        // Asked for, and asked again after the retry interval; never answered.
        let mut asked = 0;
        while asked < 2 {
            match items.recv_item().await.unwrap() {
                EdgeItem::KeysWanted(r) => {
                    assert_eq!(r, vec![to]);
                    asked += 1;
                }
                EdgeItem::BusinessKeys(_) => {}
                EdgeItem::Deliver(d) => panic!("handed without keys: {d:?}"),
            }
        }
        let (kind, reason, at_ms) = loop {
            let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("a status")
                .unwrap();
            client.ack_events(&[e.event()]).await.unwrap();
            if let BusinessEvent::Status(s) = e {
                break (s.kind, s.reason, s.at_ms);
            }
        };
        assert_eq!(
            (kind, reason),
            (StatusKind::Failed, Some(FailReason::NoDeviceKey)),
            "no `sent` first: it was never handed over"
        );
        assert!(
            at_ms >= sent_unix_ms + 1_500,
            "failed {} ms after the submit on the relay's clock (monotonic: {:?}), before the wait of 1,500 ms",
            at_ms.saturating_sub(sent_unix_ms),
            sent_at.elapsed()
        );
        // Keys published for another recipient: its message is handed, sealed.
        let world = device_world(2);
        let other = Recipient::parse(b"+4915112340010").unwrap();
        client
            .submit(vec![message(10, other.as_str())])
            .await
            .unwrap();
        let d = first_deliver(&edge, &mut items, |r| {
            let entries = world.lock().unwrap().device_keys(r);
            assert_eq!(entries.len(), r.len());
            entries
        })
        .await;
        assert!(d.e2e && d.client_id == 10);
        assert_eq!(
            world.lock().unwrap().open(&d).unwrap(),
            b"your parcel is on its way"
        );
        client.close().await;
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}

/// A device's one-time prekeys whose signatures do not verify (an edge's keys of its
/// own, or damaged ones) are never used: the relay learns the list (its signed prekeys
/// are good), checks a one-time prekey when a session is about to use it, refuses it and
/// sets the session up to the device's signed prekey. The device opens its copy; the
/// refusals are counted in the metrics, and no list is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_one_time_prekey_is_never_used_and_the_message_still_opens() {
    use courier_pipeline::e2e::{decode_bundles, encode_bundles, SessionHeader};
    use courier_pipeline::wire::delivery::decode_device_copies;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (running, business, edge_token) = start_with(dir.path(), |p| {
            p.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        });
        let metrics = running.metrics_addr().unwrap();
        let (client, _events, edge, mut items) =
            connect_business_and_edge(&running, &business, &edge_token).await;
        let world = device_world(3);
        let to = Recipient::parse(b"+4915112340011").unwrap();
        client.submit(vec![message(11, to.as_str())]).await.unwrap();
        let mut forged = 0u32;
        let d = first_deliver(&edge, &mut items, |r| {
            let mut entries = world.lock().unwrap().device_keys(r);
            for e in &mut entries {
                let mut bundles = decode_bundles(&e.bundles).unwrap();
                for k in bundles.iter_mut().flat_map(|b| &mut b.one_time_prekeys) {
                    k.signature[0] ^= 1;
                    forged += 1;
                }
                let mut bytes = Vec::new();
                encode_bundles(&bundles, &mut bytes);
                e.bundles = Bytes::from(bytes);
            }
            entries
        })
        .await;
        assert!(forged > 0, "the world's devices publish one-time prekeys");
        assert!(d.e2e && d.client_id == 11);
        for c in decode_device_copies(&d.payload).unwrap() {
            let header = SessionHeader::from_bytes(&c.header).unwrap();
            assert_eq!(header.one_time_prekey_id, None, "device {}", c.device_id);
        }
        assert_eq!(
            world.lock().unwrap().open(&d).unwrap(),
            b"your parcel is on its way"
        );
        // Counted where the sessions were set up (the stats are published every few
        // hundred ms): at most the forged ones, at least one.
        let refused_series = "courier_e2e_one_time_prekeys_refused_total";
        let text =
            super::metrics::scrape_until_with(metrics, refused_series, ">= 1", |v| v >= 1.0).await;
        let samples = super::metrics::parse(&text);
        let get = |s: &str| super::metrics::value(&samples, s).unwrap_or(0.0);
        let (refused, lists) = (
            get(refused_series),
            get("courier_e2e_bundles_refused_total"),
        );
        assert!(
            (1.0..=f64::from(forged)).contains(&refused),
            "{refused} refused of {forged} forged"
        );
        assert_eq!(lists, 0.0, "the lists themselves were good");
        client.close().await;
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}

/// A business client with its events and an edge connection granted E2E.
async fn connect_business_and_edge(
    running: &Running,
    business: &str,
    edge_token: &str,
) -> (Client, EventReceiver, DeliveryEdge, Deliveries) {
    let (client, events) = Client::connect_with_events(&client_config(running, business, 1, 1), 8)
        .await
        .unwrap();
    let (edge, items) = DeliveryEdge::connect_e2e(&client_config(running, edge_token, 1, 1), 16)
        .await
        .unwrap();
    assert!(edge.e2e());
    (client, events, edge, items)
}

/// The edge's next DELIVER; each KEYS_WANTED on the way is answered with what `keys`
/// makes of the recipients asked for.
async fn first_deliver(
    edge: &DeliveryEdge,
    items: &mut Deliveries,
    mut keys: impl FnMut(&[Recipient]) -> Vec<DeviceKeysEntry>,
) -> Deliver {
    loop {
        match items.recv_item().await.unwrap() {
            EdgeItem::KeysWanted(r) => edge.device_keys(&keys(&r)).await.unwrap(),
            EdgeItem::BusinessKeys(_) => {}
            EdgeItem::Deliver(d) => return d,
        }
    }
}

fn message(id: u64, to: &str) -> OutgoingMessage {
    OutgoingMessage {
        client_id: id,
        recipient: Recipient::parse(to.as_bytes()).unwrap(),
        payload: Bytes::from_static(b"your parcel is on its way"),
    }
}

/// Delivery's bounds full (16 waiting messages a shard) while the edge is taking
/// messages: a SUBMIT is held, not answered, until outcomes free room, and then accepted
/// (not `throttled`, which would make its sender resend it); when the edge stops
/// answering, a SUBMIT is held for the hold's second and then answered `throttled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_delivery_bounds_hold_a_sender_while_the_edge_drains() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (running, business, edge_token) = start_with(dir.path(), |p| {
            p.delivery.pending_max = 16;
            p.delivery.e2e.enabled = false;
        });
        let client = Arc::new(
            Client::connect(&client_config(&running, &business, 1, 1))
                .await
                .unwrap(),
        );
        let (edge, mut deliveries) =
            DeliveryEdge::connect(&client_config(&running, &edge_token, 1, 1), 64)
                .await
                .unwrap();
        let to = "+4915112340020";
        let batch = |ids: std::ops::RangeInclusive<u64>| ids.map(|i| message(i, to)).collect();
        let accepted = |s: &[Status]| s.iter().all(|s| matches!(s, Status::Accepted(_)));
        // Fills the business's shard's bounds; all 16 are handed to the edge.
        let first = client.submit(batch(1..=16)).await.unwrap();
        assert!(accepted(&first), "{first:?}");
        let mut handed = Vec::new();
        while handed.len() < 16 {
            handed.push(deliveries.recv().await.unwrap().message);
        }
        // Held while the edge holds the 16 without an outcome...
        let c = client.clone();
        let second = tokio::spawn(async move { c.submit(batch(17..=24)).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!second.is_finished(), "answered while delivery was full");
        // ...and accepted once outcomes free room.
        let delivered: Vec<OutcomeEntry> = handed[..8]
            .iter()
            .map(|&message| OutcomeEntry {
                message,
                outcome: Outcome::Delivered,
            })
            .collect();
        edge.outcomes(&delivered).await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("taken once outcomes freed room")
            .unwrap()
            .unwrap();
        assert!(accepted(&second), "{second:?}");
        // Full again, and the edge answers nothing more: held for the hold, then throttled.
        let t0 = Instant::now();
        let third = client.submit(batch(25..=40)).await.unwrap();
        let waited = t0.elapsed();
        assert!(
            third.iter().all(|s| *s
                == Status::Throttled {
                    retry_after_ms: 1000
                }),
            "{third:?}"
        );
        assert!(
            waited >= Duration::from_millis(900),
            "throttled after the hold, not at once: {waited:?}"
        );
        client.close().await;
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}

/// The next status the business hears (acknowledged at once), within `within`.
async fn next_status(
    client: &Client,
    events: &mut EventReceiver,
    within: Duration,
) -> Option<(StatusKind, u64)> {
    let e = tokio::time::timeout(within, events.recv())
        .await
        .ok()?
        .ok()?;
    client.ack_events(&[e.event()]).await.unwrap();
    match e {
        BusinessEvent::Status(s) => Some((s.kind, s.client_id)),
        BusinessEvent::Inbound(_) => panic!("no reply was sent"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_message_is_delivered_within_a_second_of_online() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (running, business, edge_token) = start(dir.path());
        let (client, mut events) =
            Client::connect_with_events(&client_config(&running, &business, 1, 1), 8)
                .await
                .unwrap();
        let (edge, mut deliveries) = DeviceEdge::connect(
            &client_config(&running, &edge_token, 1, 1),
            16,
            device_world(1),
        )
        .await
        .unwrap();
        let to = "+4915112340001";
        let statuses = client.submit(vec![message(7, to)]).await.unwrap();
        let Status::Accepted(position) = statuses[0] else {
            panic!("{statuses:?}");
        };
        let first = deliveries.recv().await.unwrap();
        assert_eq!((first.message, first.client_id), (position, 7));
        assert_eq!(first.recipient.as_str(), to);
        edge.outcomes(&[OutcomeEntry {
            message: first.message,
            outcome: Outcome::RetryLater,
        }])
        .await
        .unwrap();
        let within = Duration::from_secs(5);
        assert_eq!(
            next_status(&client, &mut events, within).await,
            Some((StatusKind::Sent, 7))
        );
        // Offline: nothing comes back before the backoff (a minute)...
        let early = tokio::time::timeout(Duration::from_millis(700), deliveries.recv()).await;
        assert!(early.is_err(), "handed again before ONLINE: {early:?}");
        // ...but within a second of ONLINE.
        let online_at = Instant::now();
        edge.online(&[first.recipient]).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(1), deliveries.recv())
            .await
            .expect("handed again within a second of ONLINE")
            .unwrap();
        let took = online_at.elapsed();
        assert_eq!(again.message, position, "the same message, by its id");
        edge.outcomes(&[OutcomeEntry {
            message: again.message,
            outcome: Outcome::Delivered,
        }])
        .await
        .unwrap();
        assert_eq!(
            next_status(&client, &mut events, within).await,
            Some((StatusKind::Delivered, 7))
        );
        eprintln!("ONLINE -> DELIVER again: {took:?}");
        client.close().await;
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_its_time_to_live_is_expired_at_its_business() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (running, business, edge_token) = start(dir.path());
        let (client, mut events) =
            Client::connect_with_events(&client_config(&running, &business, 1, 1), 8)
                .await
                .unwrap();
        let (edge, mut deliveries) = DeviceEdge::connect(
            &client_config(&running, &edge_token, 1, 1),
            16,
            device_world(1),
        )
        .await
        .unwrap();
        // One message lives a second and its recipient stays offline; one has no edge
        // answer at all... both have the default otherwise.
        let sent_at = Instant::now();
        let statuses = client
            .submit_ttl(vec![message(1, "+4915112340002")], 1)
            .await
            .unwrap();
        assert!(matches!(statuses[0], Status::Accepted(_)), "{statuses:?}");
        let d = deliveries.recv().await.unwrap();
        edge.outcomes(&[OutcomeEntry {
            message: d.message,
            outcome: Outcome::RetryLater,
        }])
        .await
        .unwrap();
        assert!(
            d.expires_ms > 0,
            "the DELIVER says when the relay stops trying"
        );
        let within = Duration::from_secs(5);
        assert_eq!(
            next_status(&client, &mut events, within).await,
            Some((StatusKind::Sent, 1))
        );
        assert_eq!(
            next_status(&client, &mut events, within).await,
            Some((StatusKind::Expired, 1))
        );
        let took = sent_at.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "expired after {took:?}"
        );
        // Nothing more about it: expired is final.
        assert_eq!(
            next_status(&client, &mut events, Duration::from_millis(500)).await,
            None
        );
        client.close().await;
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_v1_clients_work_unchanged_beside_delivery() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (running, business, edge_token) = start(dir.path());
        let (edge, mut deliveries) = DeviceEdge::connect(
            &client_config(&running, &edge_token, 1, 1),
            16,
            device_world(1),
        )
        .await
        .unwrap();
        // HELLO version 1: a 16-byte WELCOME, no features, no events; SUBMIT as ever.
        let v1 = Arc::new(
            Client::connect(&client_config(&running, &business, 2, 2))
                .await
                .unwrap(),
        );
        assert_eq!(v1.welcome().features, None);
        let statuses = v1
            .submit(vec![
                message(1, "+4915112340003"),
                message(2, "+4915112340004"),
            ])
            .await
            .unwrap();
        assert!(statuses.iter().all(|s| matches!(s, Status::Accepted(_))));
        // Its messages are delivered all the same; it just does not hear of it.
        for _ in 0..2 {
            let d = deliveries.recv().await.unwrap();
            edge.outcomes(&[OutcomeEntry {
                message: d.message,
                outcome: Outcome::Delivered,
            }])
            .await
            .unwrap();
        }
        assert!(matches!(
            v1.ack_events(&[courier_pipeline::wire::LogPosition(1)])
                .await,
            Err(courier_client::ClientError::FeatureRefused)
        ));
        // A relay that seals for devices hands nothing to an edge without E2E.
        assert!(matches!(
            DeliveryEdge::connect(&client_config(&running, &edge_token, 1, 1), 4).await,
            Err(courier_client::ClientError::FeatureRefused)
        ));
        // A business token cannot take deliveries, nor an edge token events.
        assert!(matches!(
            DeliveryEdge::connect(&client_config(&running, &business, 1, 1), 4).await,
            Err(courier_client::ClientError::FeatureRefused)
        ));
        assert!(matches!(
            Client::connect_with_events(&client_config(&running, &edge_token, 1, 1), 4).await,
            Err(courier_client::ClientError::FeatureRefused)
        ));
        v1.close().await;
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}
