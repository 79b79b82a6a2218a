//! Lanes: a store split into lanes ([`Store::lanes`](crate::store::Store::lanes))
//! is worked by one run loop per lane, each a task of its own, so that on a
//! multi-thread runtime the lanes run in parallel. This module holds what
//! the loops of one run share: their wake-ups, their stop signal, and the
//! rule for when a `run_until_idle` of several lanes is over.

use std::sync::Mutex;

use tokio::sync::{Notify, watch};

/// Wakes the run loops: one signal per lane, so a wake-up (a new item, a
/// decision, a retry) reaches every lane's loop, whichever is waiting.
pub(super) struct Wake {
    lanes: Box<[Notify]>,
}

impl Wake {
    /// Signals for `lanes` lanes (at least one).
    pub(super) fn new(lanes: usize) -> Self {
        Wake {
            lanes: (0..lanes.max(1)).map(|_| Notify::new()).collect(),
        }
    }

    /// Wakes the loop of every lane (or, if it is not waiting, lets its
    /// next wait end at once).
    pub(super) fn all(&self) {
        for lane in self.lanes.iter() {
            lane.notify_one();
        }
    }

    /// Completes once lane `lane` is woken.
    pub(super) async fn notified(&self, lane: usize) {
        self.lanes[lane % self.lanes.len()].notified().await;
    }
}

/// What the run loops of one multi-lane run share.
pub(super) struct LaneGroup {
    lanes: usize,
    /// Set once the run is to stop: shutdown was asked, or a lane failed.
    stop: watch::Sender<bool>,
    idle: Mutex<Idleness>,
    /// Signalled when a round of idle checks starts or the run is over.
    changed: Notify,
}

/// How far the lanes of a `run_until_idle` are from being done.
#[derive(Default)]
struct Idleness {
    /// Lanes waiting with nothing to do.
    waiting: usize,
    /// Whether a lane claimed work, or made some runnable, since the
    /// current round of idle checks began.
    progressed: bool,
    /// Rounds begun: each round every lane looks for work once more.
    round: u64,
    /// Every lane found nothing in a whole round: the run is over.
    done: bool,
}

/// What an idle lane of a `run_until_idle` does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Rejoin {
    /// Look for work again.
    Claim,
    /// The run is over.
    Finish,
}

impl LaneGroup {
    /// The shared state of a run of `lanes` loops.
    pub(super) fn new(lanes: usize) -> Self {
        LaneGroup {
            lanes,
            stop: watch::channel(false).0,
            idle: Mutex::new(Idleness::default()),
            changed: Notify::new(),
        }
    }

    /// How many loops the run has, one per lane.
    pub(super) fn lanes(&self) -> usize {
        self.lanes
    }

    /// Asks every loop to stop claiming and finish its running attempts.
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Completes once [`LaneGroup::stop`] was called.
    pub(super) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.subscribe();
        async move {
            // The sender lives as long as the group, which outlives the loops.
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }

    /// Called by a lane of a `run_until_idle` that has nothing to do;
    /// `progressed` says whether it claimed work or made work runnable
    /// since it last came here. Returns once the lane should look for
    /// work again (it was woken, or a new round of checks began) or the
    /// run is over.
    ///
    /// A run is over only after a whole round in which every lane looked
    /// for work and found none, with no lane running anything: work one
    /// lane made runnable in another (a review deadline it decided) is
    /// found by that round.
    pub(super) async fn rejoin(&self, progressed: bool, wake: impl Future<Output = ()>) -> Rejoin {
        let changed = self.changed.notified();
        tokio::pin!(changed);
        // Registered before the state is read, so no signal is missed.
        changed.as_mut().enable();
        let round = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.waiting += 1;
            idle.progressed |= progressed;
            if idle.waiting == self.lanes {
                idle.waiting = 0;
                if idle.progressed {
                    idle.progressed = false;
                    idle.round += 1;
                } else {
                    idle.done = true;
                }
                self.changed.notify_waiters();
                return if idle.done {
                    Rejoin::Finish
                } else {
                    Rejoin::Claim
                };
            }
            idle.round
        };
        tokio::select! {
            () = changed => {}
            () = wake => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.round == round && !idle.done {
                    // Out of the round, to claim what woke it.
                    idle.waiting -= 1;
                    idle.progressed = true;
                    return Rejoin::Claim;
                }
            }
        }
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.done {
            Rejoin::Finish
        } else {
            Rejoin::Claim
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_run_ends_only_after_a_round_in_which_no_lane_progressed() {
        let group = Arc::new(LaneGroup::new(2));
        // Lane 0 waits while lane 1 still works.
        let first = tokio::spawn({
            let group = group.clone();
            async move { group.rejoin(false, std::future::pending()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!first.is_finished(), "one lane idle is not the end");
        // Lane 1 arrives having done work: a new round, not the end.
        assert_eq!(
            group.rejoin(true, std::future::pending()).await,
            Rejoin::Claim
        );
        assert_eq!(first.await.unwrap(), Rejoin::Claim);
        // A round with no progress ends the run, for both lanes.
        let first = tokio::spawn({
            let group = group.clone();
            async move { group.rejoin(false, std::future::pending()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            group.rejoin(false, std::future::pending()).await,
            Rejoin::Finish
        );
        assert_eq!(first.await.unwrap(), Rejoin::Finish);
    }

    #[tokio::test]
    async fn a_woken_lane_leaves_the_round_and_the_run_goes_on() {
        let group = Arc::new(LaneGroup::new(2));
        let wake = Arc::new(Notify::new());
        let first = tokio::spawn({
            let (group, wake) = (group.clone(), wake.clone());
            async move { group.rejoin(false, wake.notified()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        wake.notify_one();
        assert_eq!(first.await.unwrap(), Rejoin::Claim);
        // The woken lane is out of the round: the other one alone is not
        // every lane, so it waits.
        let second = tokio::spawn({
            let group = group.clone();
            async move { group.rejoin(false, std::future::pending()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished());
        // The woken lane comes back having claimed work: another round.
        assert_eq!(
            group.rejoin(true, std::future::pending()).await,
            Rejoin::Claim
        );
        assert_eq!(second.await.unwrap(), Rejoin::Claim);
    }
}
