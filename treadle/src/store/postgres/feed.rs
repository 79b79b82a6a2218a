//! The live feed: every event committed to the log, by any process, sent
//! to this process's subscribers in log order.
//!
//! One task owns the cursor (the last sequence number sent). Events this
//! process commits are handed to it directly; those of other processes are
//! read from the log when a NOTIFY hints at them, and by polling as the
//! fallback (a missed notification, a lost listening connection). After a
//! reconnect the task catches up from its cursor, so nothing is skipped.
//! While nobody is subscribed it reads nothing: it moves the cursor past
//! what was committed (a subscriber is owed only what commits after it
//! subscribed), so a process that only writes does not read every other
//! process's events.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{AsyncMessage, NoTls};

use super::conn::{self, Db};
use super::read;
use crate::error::Result;
use crate::event::Event;
use crate::store::{EVENT_FEED_CAPACITY, EventQuery};

/// How often the log is polled when no notification arrives.
const POLL: Duration = Duration::from_millis(500);

/// How many events one catch-up read takes at most.
const PAGE: usize = 4096;

/// The sending side of the feed.
#[derive(Debug)]
pub(super) struct Feed {
    sender: broadcast::Sender<Event>,
    local: mpsc::UnboundedSender<Vec<Event>>,
}

impl Feed {
    /// Starts the feed task, reading the log through `pool` and listening
    /// on `channel` with a connection of its own made from `config`. It
    /// stops when the feed is dropped.
    pub(super) async fn start(
        pool: Pool,
        config: tokio_postgres::Config,
        channel: String,
    ) -> Result<Self> {
        let client = conn::get(&pool).await?;
        let row = Db::client(&client)
            .one("SELECT last FROM event_counter WHERE id = 1", &[])
            .await?;
        let cursor: i64 = row.get(0);
        drop(client);
        let (sender, _) = broadcast::channel(EVENT_FEED_CAPACITY);
        let (local, committed) = mpsc::unbounded_channel();
        let task = Task {
            pool,
            sender: sender.clone(),
            cursor: cursor as u64,
        };
        tokio::spawn(task.run(committed, config, channel));
        Ok(Feed { sender, local })
    }

    /// A new subscriber.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Hands over events this process just committed, in log order.
    pub(super) fn committed(&self, events: Vec<Event>) {
        if !events.is_empty() {
            // The task is gone only when the store is: nobody to tell.
            let _ = self.local.send(events);
        }
    }
}

struct Task {
    pool: Pool,
    sender: broadcast::Sender<Event>,
    cursor: u64,
}

impl Task {
    async fn run(
        mut self,
        mut committed: mpsc::UnboundedReceiver<Vec<Event>>,
        config: tokio_postgres::Config,
        channel: String,
    ) {
        let (hint, mut hints) = mpsc::unbounded_channel();
        let listening = tokio::spawn(listen(config, channel, hint));
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let caught_up = tokio::select! {
                events = committed.recv() => match events {
                    Some(events) => self.local(events).await,
                    None => break,
                },
                Some(last) = hints.recv() => {
                    if last > self.cursor {
                        self.catch_up_to(last).await
                    } else {
                        Ok(())
                    }
                }
                _ = poll.tick() => self.catch_up().await,
            };
            if let Err(error) = caught_up {
                tracing::warn!(%error, "the event feed could not read the log; retrying");
            }
        }
        listening.abort();
    }

    /// Sends this process's committed events, reading any gap before them
    /// from the log first.
    async fn local(&mut self, events: Vec<Event>) -> Result<()> {
        let first = events.first().map_or(0, |e| e.seq);
        if first > self.cursor + 1 {
            self.catch_up_to(first - 1).await?;
        }
        for event in events {
            if event.seq == self.cursor + 1 {
                self.send(event);
            }
        }
        Ok(())
    }

    /// Sends every event committed after the cursor.
    async fn catch_up(&mut self) -> Result<()> {
        self.catch_up_to(u64::MAX).await
    }

    /// Sends the events after the cursor up to `last` (`u64::MAX`: all).
    /// With nobody subscribed it only moves the cursor past them: nobody is
    /// owed them, and reading them would be wasted.
    async fn catch_up_to(&mut self, last: u64) -> Result<()> {
        if self.sender.receiver_count() > 0 {
            return self.read_to(last).await;
        }
        // The number is taken before looking for subscribers again: the
        // events up to it were committed before, so a subscriber that
        // arrives meanwhile is owed none of them.
        let head = match last {
            u64::MAX => {
                let client = conn::get(&self.pool).await?;
                let row = Db::client(&client)
                    .one("SELECT last FROM event_counter WHERE id = 1", &[])
                    .await?;
                u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)
            }
            last => last,
        };
        if self.sender.receiver_count() > 0 {
            return self.read_to(last).await;
        }
        self.cursor = self.cursor.max(head);
        Ok(())
    }

    /// Reads the log after the cursor up to `last`, sending what it reads.
    async fn read_to(&mut self, last: u64) -> Result<()> {
        let client = conn::get(&self.pool).await?;
        loop {
            let page = read::events(
                Db::client(&client),
                &EventQuery {
                    after: self.cursor,
                    item_id: None,
                    limit: Some(PAGE),
                },
            )
            .await?;
            let full = page.len() == PAGE;
            for event in page {
                if event.seq > last {
                    return Ok(());
                }
                self.send(event);
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn send(&mut self, event: Event) {
        self.cursor = event.seq;
        if self.sender.receiver_count() > 0 {
            // A subscriber that has gone away is not an error: the log keeps every event.
            let _ = self.sender.send(event);
        }
    }
}

/// Listens on `channel`, passing on the last sequence number each
/// notification names; reconnects (and asks the feed to catch up) whenever
/// the connection is lost. Stops when the feed task is gone.
async fn listen(config: tokio_postgres::Config, channel: String, hint: mpsc::UnboundedSender<u64>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                backoff = Duration::from_millis(50);
                let (messages, mut incoming) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(message) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match message {
                            Ok(AsyncMessage::Notification(note)) => {
                                // A payload that is not a number still hints at news.
                                let last = note.payload().parse().unwrap_or(u64::MAX);
                                if messages.send(last).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {channel}"))
                    .await
                    .is_ok()
                {
                    // Catch up on what was committed before listening.
                    if hint.send(u64::MAX).is_err() {
                        return;
                    }
                    while let Some(last) = incoming.recv().await {
                        if hint.send(last).is_err() {
                            return;
                        }
                    }
                }
                driver.abort();
                tracing::warn!("the event feed lost its listening connection; reconnecting");
            }
            Err(error) => {
                tracing::warn!(%error, "the event feed cannot connect to listen; retrying");
            }
        }
        if hint.send(u64::MAX).is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
