//! The sending half of a session that follows an [`Exporter`]: a gateway's Sync session with a
//! peer's gateway, and a node's Watch of its gateway's merged import. Both start where the
//! receiver's Hello says it stands (a resume, else a snapshot) and then send what each change of
//! the exporter adds.

use std::sync::Mutex;

use tokio::sync::watch;
use weir_proto::mesh::v1 as pb;

use crate::{
    export::Export,
    sync::{Exporter, Frame, Limits, Resume},
};

/// Where one session's sending stands in an exporter's history.
pub struct ExportFeed {
    /// The exporter's version the receiver has been sent up to.
    sent: u64,
    /// Entries one delta may carry: the receiver's limit, never above ours.
    max_delta: usize,
    /// Notified of every change of the exporter after the feed opened.
    changes: watch::Receiver<u64>,
}

impl ExportFeed {
    /// Opens the feed for a receiver that sent `hello`, and returns the frames it starts with.
    /// Subscribes to `changes` before the catch-up is taken, so no change between the two is
    /// missed (it is then sent by [`ExportFeed::next_frames`], or found already sent).
    pub fn open(
        exporter: &Mutex<Exporter<Export>>,
        changes: &watch::Sender<u64>,
        hello: &pb::Hello,
        ours: &Limits,
    ) -> (Self, Vec<Frame<Export>>) {
        let max_delta = hello.limits.map_or(ours.max_delta_entries, |l| {
            (l.max_delta_entries as usize).clamp(1, ours.max_delta_entries)
        });
        let resume = hello.resume.map(|r| Resume {
            incarnation: r.incarnation,
            version: r.version,
        });
        let mut subscribed = changes.subscribe();
        let (frames, sent) = {
            let exporter = exporter.lock().unwrap_or_else(|p| p.into_inner());
            (
                exporter.catch_up(resume, max_delta, true),
                exporter.version(),
            )
        };
        subscribed.mark_unchanged();
        let feed = Self {
            sent,
            max_delta,
            changes: subscribed,
        };
        (feed, frames)
    }

    /// Waits for the exporter to change; an error once it is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.changes.changed().await
    }

    /// The frames that bring the receiver from what it was sent to the exporter's version now.
    pub fn next_frames(&mut self, exporter: &Mutex<Exporter<Export>>) -> Vec<Frame<Export>> {
        let exporter = exporter.lock().unwrap_or_else(|p| p.into_inner());
        let from = Resume {
            incarnation: exporter.incarnation(),
            version: self.sent,
        };
        self.sent = exporter.version();
        exporter.catch_up(Some(from), self.max_delta, false)
    }
}
