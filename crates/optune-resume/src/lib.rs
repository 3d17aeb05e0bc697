//! Continuing a killed run where it stopped.
//!
//! A long stage (generation, scoring with a reward model, training) that is killed — a crash,
//! `kill -9`, a preempted Slurm job — should not lose what it finished. The tools keep it beside
//! their output, and the same command run again continues from it:
//!
//! - [`Journal`]: the rows a tool has finished, appended every few seconds to `OUTPUT.journal`
//!   as JSON lines (opt-gen, opt-score).
//! - [`Fingerprint`]: what makes a run's results what they are (the arguments that change the
//!   output, and the inputs' identity). A journal or a training state is continued only by a
//!   run with the same fingerprint; any other run is refused with the values that differ.
//!
//! What a tool keeps is removed once its output is complete.

mod fingerprint;
mod journal;

pub use fingerprint::{file_stamps, Digest, Fingerprint};
pub use journal::{journal_path, Journal};
