//! Work spread over the replicas of `--devices`: one host thread per replica.

/// Runs `work` once for each of `workers` (with its index), each on a thread of its own but the
/// first, which runs on this one (the threads flush denormals, as the runtime's do); returns the
/// results in the order of `workers` once all have ended, raising a worker's panic again.
pub fn on_each<W: Send, T: Send>(
    workers: &mut [W],
    work: impl Fn(usize, &mut W) -> T + Sync,
) -> Vec<T> {
    let Some((first, others)) = workers.split_first_mut() else {
        return Vec::new();
    };
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .iter_mut()
            .enumerate()
            .map(|(i, worker)| {
                scope.spawn(move || {
                    optune_kernels::runtime::flush_denormals_on_this_thread();
                    work(i + 1, worker)
                })
            })
            .collect();
        let mut results = vec![work(0, first)];
        results.extend(handles.into_iter().map(|handle| {
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }));
        results
    })
}

#[cfg(test)]
mod tests {
    use super::on_each;

    /// Every worker runs once, on a thread of its own but the first, and the results come back
    /// in the workers' order.
    #[test]
    fn each_worker_runs_once_and_results_keep_their_order() {
        let here = std::thread::current().id();
        let mut workers: Vec<usize> = (0..5).collect();
        let results = on_each(&mut workers, |i, worker| {
            *worker += 10;
            (i, *worker, std::thread::current().id() == here)
        });
        let expected: Vec<_> = (0..5).map(|i| (i, i + 10, i == 0)).collect();
        assert_eq!(results, expected);
        assert!(on_each(&mut Vec::<usize>::new(), |i, _| i).is_empty());
    }
}
