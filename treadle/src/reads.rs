//! Read checks: a stage may read only the outputs of stages upstream of it.
//!
//! The rule and its messages are written once here: `pipeline!` applies them
//! at compile time (in constants, through `__private`) and
//! `Pipeline::builder()` at run time.

use std::fmt;

/// Why a read is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFault {
    /// The stage reads its own output.
    Itself,
    /// The producer is not a stage of the pipeline.
    NotInPipeline,
    /// The producer is in the pipeline but not upstream of the reader
    /// (downstream of it, or on another branch).
    NotUpstream,
}

/// A stage that reads the output of a stage it may not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadProblem {
    /// The reading stage.
    pub reader: String,
    /// The stage whose output it reads.
    pub producer: String,
    /// What is wrong with the read.
    pub fault: ReadFault,
}

impl fmt::Display for ReadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in message_parts(self.fault, &self.reader, &self.producer) {
            f.write_str(part)?;
        }
        Ok(())
    }
}

/// The message for a bad read, in pieces (so that constants can assemble it).
pub(crate) const fn message_parts<'a>(
    fault: ReadFault,
    reader: &'a str,
    producer: &'a str,
) -> [&'a str; 7] {
    match fault {
        ReadFault::Itself => [
            "`",
            reader,
            "` reads its own output; a stage reads only the outputs of stages upstream of it",
            "",
            "",
            "",
            "",
        ],
        ReadFault::NotInPipeline => [
            "`",
            reader,
            "` reads the output of `",
            producer,
            "`, which is not a stage of this pipeline",
            "",
            "",
        ],
        ReadFault::NotUpstream => [
            "`",
            reader,
            "` reads the output of `",
            producer,
            "`, which is not upstream of `",
            reader,
            "` in this pipeline",
        ],
    }
}

/// Checks that `reader` (an index into `names`) may read stage `producer`
/// in the graph of `edges` (`(from, to)` indices). `seen` and `stack` are
/// scratch space of `names.len()` entries. Works on any graph, cycles
/// included; linear in nodes + edges.
pub(crate) const fn check_read(
    names: &[&str],
    edges: &[(usize, usize)],
    reader: usize,
    producer: &str,
    seen: &mut [bool],
    stack: &mut [usize],
) -> Option<ReadFault> {
    let mut target = names.len();
    let mut i = 0;
    while i < names.len() {
        if str_eq(names[i], producer) {
            target = i;
        }
        i += 1;
    }
    if target == names.len() {
        return Some(ReadFault::NotInPipeline);
    }
    if target == reader {
        return Some(ReadFault::Itself);
    }
    // Walk upstream from the reader.
    let mut i = 0;
    while i < seen.len() {
        seen[i] = false;
        i += 1;
    }
    seen[reader] = true;
    stack[0] = reader;
    let mut depth = 1;
    while depth > 0 {
        depth -= 1;
        let node = stack[depth];
        let mut e = 0;
        while e < edges.len() {
            let (from, to) = edges[e];
            if to == node && !seen[from] {
                if from == target {
                    return None;
                }
                seen[from] = true;
                stack[depth] = from;
                depth += 1;
            }
            e += 1;
        }
    }
    Some(ReadFault::NotUpstream)
}

/// Whether two strings are equal, usable in constants.
pub(crate) const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reader: usize, producer: &str) -> Option<ReadFault> {
        // a -> b -> d; a -> c -> d
        let names = ["a", "b", "c", "d"];
        let edges = [(0, 1), (1, 3), (0, 2), (2, 3)];
        check_read(
            &names,
            &edges,
            reader,
            producer,
            &mut [false; 4],
            &mut [0; 4],
        )
    }

    #[test]
    fn ancestors_may_be_read_and_nothing_else() {
        assert_eq!(check(3, "a"), None);
        assert_eq!(check(3, "b"), None);
        assert_eq!(check(3, "c"), None);
        assert_eq!(check(1, "a"), None);
        assert_eq!(check(1, "c"), Some(ReadFault::NotUpstream));
        assert_eq!(check(0, "d"), Some(ReadFault::NotUpstream));
        assert_eq!(check(2, "c"), Some(ReadFault::Itself));
        assert_eq!(check(2, "x"), Some(ReadFault::NotInPipeline));
    }

    #[test]
    fn cycles_do_not_loop() {
        let names = ["a", "b", "c"];
        let edges = [(0, 1), (1, 0)];
        let fault = check_read(&names, &edges, 0, "c", &mut [false; 3], &mut [0; 3]);
        assert_eq!(fault, Some(ReadFault::NotUpstream));
    }

    #[test]
    fn messages() {
        let problem = |fault| ReadProblem {
            reader: "enrich".into(),
            producer: "review".into(),
            fault,
        };
        assert_eq!(
            problem(ReadFault::NotUpstream).to_string(),
            "`enrich` reads the output of `review`, which is not upstream of `enrich` in this pipeline"
        );
        assert_eq!(
            problem(ReadFault::NotInPipeline).to_string(),
            "`enrich` reads the output of `review`, which is not a stage of this pipeline"
        );
        assert_eq!(
            problem(ReadFault::Itself).to_string(),
            "`enrich` reads its own output; a stage reads only the outputs of stages upstream of it"
        );
    }
}
