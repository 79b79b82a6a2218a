//! Answers from the writer thread to the tasks waiting for them, with one
//! cross-thread wake-up per group commit instead of one per transition.
//!
//! Waking a task from outside its runtime costs a system call (the runtime's
//! driver is woken through a file descriptor) every time, and a group commit
//! answers hundreds of transitions. So the writer sets every answer of a
//! group first, then wakes just one of the waiting tasks and hands it the
//! others' wakers ([`wake_all`]); that task wakes them from its own thread,
//! which the runtime schedules locally, when it is polled, or when it is
//! dropped, whichever comes first. A task that is already done cannot take
//! the others, so the writer tries the next one. The others therefore run
//! once the woken task's runtime gets to it: at once on an engine's own
//! runtime, later if the store is shared with a runtime whose threads are
//! all busy.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};

/// Where one answer is left.
struct Slot<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    /// The answer, until the waiting task takes it.
    answer: Option<Result<T>>,
    /// The waiting task's waker, once it has waited.
    waker: Option<Waker>,
    /// Other tasks' wakers this task wakes once it runs or is dropped.
    relay: Vec<Waker>,
    /// The waiting side took its answer or stopped waiting.
    done: bool,
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing in this module panics while holding the lock.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A slot the writer can hand other tasks' wakers to, whatever its answer's type.
trait Relay: Send + Sync {
    /// Takes `others` to wake unless the waiting side is done (then they
    /// stay in `others`); `true` if it took them.
    fn adopt(&self, others: &mut Vec<Waker>) -> bool;
}

impl<T: Send> Relay for Slot<T> {
    fn adopt(&self, others: &mut Vec<Waker>) -> bool {
        let mut state = self.lock();
        if state.done {
            return false;
        }
        state.relay.append(others);
        true
    }
}

/// A new answer slot: the writer's end and the waiting task's end.
pub(crate) fn channel<T: Send + 'static>() -> (Answer<T>, Answered<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State {
            answer: None,
            waker: None,
            relay: Vec::new(),
            done: false,
        }),
    });
    (
        Answer {
            slot: Some(slot.clone()),
        },
        Answered { slot },
    )
}

/// The writer's end: answers once. Dropped unanswered, it answers
/// [`Error::StoreClosed`].
pub(crate) struct Answer<T: Send + 'static> {
    slot: Option<Arc<Slot<T>>>,
}

/// A task to wake once its group commit is answered (see [`wake_all`]).
pub(crate) struct Wake {
    slot: Arc<dyn Relay>,
    waker: Waker,
}

impl<T: Send + 'static> Answer<T> {
    /// Leaves `answer` for the waiting task; returns the task to wake, if
    /// it is waiting (one that has not waited yet finds the answer itself).
    pub(crate) fn send(mut self, answer: Result<T>) -> Option<Wake> {
        let slot = self.slot.take()?;
        let waker = {
            let mut state = slot.lock();
            if state.done {
                return None;
            }
            state.answer = Some(answer);
            state.waker.take()
        };
        waker.map(|waker| Wake { slot, waker })
    }
}

impl<T: Send + 'static> Drop for Answer<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let waker = {
                let mut state = slot.lock();
                state.answer = Some(Err(Error::StoreClosed));
                state.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// Wakes every task of `tasks`: one from here, the others through it.
pub(crate) fn wake_all(tasks: Vec<Wake>) {
    let (mut slots, mut wakers): (Vec<_>, Vec<_>) =
        tasks.into_iter().map(|t| (t.slot, t.waker)).unzip();
    while let (Some(slot), Some(own)) = (slots.pop(), wakers.pop()) {
        if slot.adopt(&mut wakers) {
            own.wake();
            return;
        }
        // That task is done: it needs no wake-up and cannot relay.
    }
}

/// The waiting task's end: a future of the answer.
pub(crate) struct Answered<T> {
    slot: Arc<Slot<T>>,
}

impl<T> Answered<T> {
    /// Marks this end done and wakes the tasks it was handed.
    fn finish(state: &mut State<T>) -> Vec<Waker> {
        state.done = true;
        state.waker = None;
        std::mem::take(&mut state.relay)
    }
}

impl<T> Future for Answered<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let (answer, relay) = {
            let mut state = self.slot.lock();
            match state.answer.take() {
                Some(answer) => (answer, Self::finish(&mut state)),
                None => {
                    match &state.waker {
                        Some(waker) if waker.will_wake(cx.waker()) => {}
                        _ => state.waker = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
            }
        };
        relay.into_iter().for_each(Waker::wake);
        Poll::Ready(answer)
    }
}

impl<T> Drop for Answered<T> {
    fn drop(&mut self) {
        let relay = Self::finish(&mut self.slot.lock());
        relay.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waiting(count: usize) -> Vec<(Answer<usize>, Answered<usize>, Arc<Counter>)> {
        (0..count)
            .map(|_| {
                let (answer, mut answered) = channel();
                let counter = Arc::new(Counter::default());
                let waker = Waker::from(counter.clone());
                let polled = Pin::new(&mut answered).poll(&mut Context::from_waker(&waker));
                assert!(polled.is_pending());
                (answer, answered, counter)
            })
            .collect()
    }

    fn woken(counter: &Counter) -> usize {
        counter.0.load(Ordering::SeqCst)
    }

    #[test]
    fn one_task_is_woken_and_wakes_the_others_when_it_runs() {
        let tasks = waiting(3);
        let mut wakes = Vec::new();
        let mut ends = Vec::new();
        for (n, (answer, answered, counter)) in tasks.into_iter().enumerate() {
            wakes.extend(answer.send(Ok(n)));
            ends.push((answered, counter));
        }
        assert_eq!(wakes.len(), 3);
        wake_all(wakes);
        let counts: Vec<usize> = ends.iter().map(|(_, c)| woken(c)).collect();
        assert_eq!(
            counts.iter().sum::<usize>(),
            1,
            "one task is woken from outside"
        );
        let relay = counts.iter().position(|&c| c == 1).unwrap();
        let (answered, counter) = &mut ends[relay];
        let waker = Waker::from(counter.clone());
        let answer = Pin::new(answered).poll(&mut Context::from_waker(&waker));
        assert!(matches!(answer, Poll::Ready(Ok(n)) if n == relay));
        let counts: Vec<usize> = ends.iter().map(|(_, c)| woken(c)).collect();
        assert_eq!(counts, [1, 1, 1], "it woke the others when it ran");
        for (n, (answered, counter)) in ends.iter_mut().enumerate() {
            if n != relay {
                let waker = Waker::from(counter.clone());
                let answer = Pin::new(answered).poll(&mut Context::from_waker(&waker));
                assert!(matches!(answer, Poll::Ready(Ok(m)) if m == n));
            }
        }
    }

    #[test]
    fn a_task_that_stopped_waiting_is_skipped_and_one_dropped_later_still_relays() {
        let mut tasks = waiting(3);
        // The writer tries the last task first: that one has gone.
        let (answer, answered, counter) = tasks.pop().unwrap();
        // Sets its answer (the writer holds its waker), then the task goes.
        let first = answer.send(Ok(0));
        drop(answered);
        let mut wakes: Vec<Wake> = first.into_iter().collect();
        let mut ends = Vec::new();
        for (answer, answered, counter) in tasks {
            wakes.extend(answer.send(Ok(1)));
            ends.push((answered, counter));
        }
        wake_all(wakes);
        assert_eq!(woken(&counter), 0, "a task that is gone is not woken");
        assert_eq!(woken(&ends[1].1), 1, "the next one relays");
        assert_eq!(woken(&ends[0].1), 0);
        // The relaying task is dropped before it runs: it still wakes the other.
        drop(ends.remove(1));
        assert_eq!(woken(&ends[0].1), 1);
    }

    #[test]
    fn an_answer_dropped_unsent_tells_the_task_the_store_closed() {
        let mut tasks = waiting(1);
        let (answer, mut answered, counter) = tasks.remove(0);
        drop(answer);
        assert_eq!(woken(&counter), 1);
        let waker = Waker::from(counter.clone());
        let answer = Pin::new(&mut answered).poll(&mut Context::from_waker(&waker));
        assert!(matches!(answer, Poll::Ready(Err(Error::StoreClosed))));
    }

    #[test]
    fn an_answer_sent_before_the_task_waits_needs_no_wake_up() {
        let (answer, mut answered) = channel();
        assert!(answer.send(Ok(7)).is_none());
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        let polled = Pin::new(&mut answered).poll(&mut Context::from_waker(&waker));
        assert!(matches!(polled, Poll::Ready(Ok(7))));
        assert_eq!(woken(&counter), 0);
    }
}
