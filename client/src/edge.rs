//! The platform's delivery edge as a client: a platform credential's connection with
//! the DELIVERY feature. It takes the messages the relay hands over, reports what
//! became of each, says when recipients come online and hands over users' replies.
//!
//! ```text
//! DeliveryEdge::connect(cfg, window) ── HELLO v2 (DELIVERY) ── WELCOME ── CREDIT(window)
//!   Deliveries::recv() <── DELIVER (at least once; drop copies by message id)
//!   outcomes([..])     ──> OUTCOME: delivered | read | failed(reason) | retry_later
//!   online([..])       ──> ONLINE: the recipients' waiting messages are due at once
//!   inbound(replies)   ──> INBOUND on a submit stream <── ACK: accepted(position) once
//!                          durable, throttled(retry_after) when the business's queue or
//!                          the relay's memory bound is full, rejected(reason)
//! with E2E (connect_e2e):
//!   Deliveries::recv_item() <── DELIVER_E2E (a copy per device), KEYS_WANTED(recipients),
//!                               BUSINESS_KEYS (the keys replies are sealed to)
//!   device_keys([..])  ──> DEVICE_KEYS: each recipient's signed device bundles
//!   inbound(replies)   ──> the payloads are `e2e::SealedReply` bytes; one that does not
//!                          open is answered rejected(bad_ciphertext)
//! ```
//!
//! Every DELIVER needs an OUTCOME within the relay's `delivery.outcome_timeout_ms`, or it
//! is handed again. `retry_later` makes the relay back off (doubling from
//! `delivery.retry_backoff_min_ms`) until ONLINE names the recipient.

use bytes::BytesMut;
use courier_pipeline::wire::delivery::{features, DeviceKeysEntry, InboundEntry, OutcomeEntry};
use courier_pipeline::wire::{Recipient, Status, Welcome};

use crate::events::{encode_credit, encode_device_keys, encode_online, encode_outcomes};
use crate::subscription::{Control, Deliveries};
use crate::{Client, ClientConfig, ClientError};

/// Most DELIVERs an edge connection may hold granted (the relay's own bound).
pub const WINDOW_MAX: u32 = 1 << 20;

/// A connected delivery edge. Share it between tasks (`Arc`): every method takes `&self`.
#[derive(Debug)]
pub struct DeliveryEdge {
    client: Client,
}

impl DeliveryEdge {
    /// Connects with a platform credential's token, asks for the DELIVERY feature and
    /// grants `window` DELIVERs (1 ..= [`WINDOW_MAX`]). Fails with
    /// [`ClientError::FeatureRefused`] when the token is not a platform credential.
    pub async fn connect(
        cfg: &ClientConfig,
        window: u32,
    ) -> Result<(DeliveryEdge, Deliveries), ClientError> {
        DeliveryEdge::connect_with(cfg, window, features::DELIVERY).await
    }

    /// [`DeliveryEdge::connect`] asking for end-to-end sealing too (DELIVERY | E2E):
    /// messages come sealed for the recipients' devices, the relay asks for device keys
    /// and publishes the businesses' reply keys ([`crate::EdgeItem`]). Whether the relay
    /// granted E2E: [`DeliveryEdge::e2e`]; a relay that seals for devices refuses
    /// DELIVERY without it ([`ClientError::FeatureRefused`]).
    pub async fn connect_e2e(
        cfg: &ClientConfig,
        window: u32,
    ) -> Result<(DeliveryEdge, Deliveries), ClientError> {
        DeliveryEdge::connect_with(cfg, window, features::DELIVERY | features::E2E).await
    }

    async fn connect_with(
        cfg: &ClientConfig,
        window: u32,
        asked: u32,
    ) -> Result<(DeliveryEdge, Deliveries), ClientError> {
        if window == 0 || window > WINDOW_MAX {
            return Err(ClientError::Config(
                "the credit window must be in 1..=1048576",
            ));
        }
        let (client, rx) = Client::connect_inner(cfg, Some(asked), window as usize).await?;
        let (control, rx) = match (client.control_for(features::DELIVERY), rx) {
            (Ok(c), Some(rx)) => (c.clone(), rx),
            _ => {
                client.close().await;
                return Err(ClientError::FeatureRefused);
            }
        };
        let mut out = BytesMut::new();
        encode_credit(window, &mut out);
        control.send(out.freeze()).await?;
        Ok((
            DeliveryEdge { client },
            Deliveries::new(rx, control, window),
        ))
    }

    fn control(&self) -> Result<&Control, ClientError> {
        self.client.control_for(features::DELIVERY)
    }

    /// Reports what became of messages handed over (split into frames within the
    /// relay's bounds).
    pub async fn outcomes(&self, entries: &[OutcomeEntry]) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        encode_outcomes(self.client.session(), entries, &mut out);
        self.control()?.send(out.freeze()).await
    }

    /// Says these recipients are online: their waiting messages are handed over at once.
    pub async fn online(&self, recipients: &[Recipient]) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        encode_online(self.client.session(), recipients, &mut out);
        self.control()?.send(out.freeze()).await
    }

    /// Whether the relay granted end-to-end sealing.
    pub fn e2e(&self) -> bool {
        self.client.session().features() & features::E2E != 0
    }

    /// Publishes recipients' device bundles (answering KEYS_WANTED, or at a rotation;
    /// a list with no device says the recipient has none).
    pub async fn device_keys(&self, entries: &[DeviceKeysEntry]) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        encode_device_keys(self.client.session(), entries, &mut out);
        self.control()?.send(out.freeze()).await
    }

    /// Grants `credit` more DELIVERs beyond what [`Deliveries`] grants back by itself.
    pub async fn grant(&self, credit: u32) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        encode_credit(credit, &mut out);
        self.control()?.send(out.freeze()).await
    }

    /// Hands over users' replies (one INBOUND batch within the WELCOME bounds) and waits
    /// for the relay's ACK: one status per reply, `accepted(position)` once it is durable
    /// (the position is the event id its business hears).
    pub async fn inbound(&self, entries: Vec<InboundEntry>) -> Result<Vec<Status>, ClientError> {
        let batch_id = self.client.next_batch_id();
        let mut frame = BytesMut::new();
        self.client
            .session()
            .encode_inbound(batch_id, &entries, &mut frame)?;
        self.client
            .send_job(frame.freeze(), batch_id, entries.len())
            .await
    }

    /// The bounds the relay stated in WELCOME.
    pub fn welcome(&self) -> Welcome {
        self.client.welcome()
    }

    /// Whether the connection is closed, and why.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.client.close_reason()
    }

    /// Closes the connection. Messages handed over and not yet reported are handed
    /// again (to any edge connection) once their `delivery.outcome_timeout_ms` passes.
    pub async fn close(&self) {
        self.client.close().await;
    }
}
