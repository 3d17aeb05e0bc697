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

/// Which replica owns each of the trained weights, given their element counts in order: the
/// owner keeps the weight's optimiser moments on its device and steps it (so the moments are
/// dealt out, not all on the first device). Each weight goes to the replica whose equal share
/// of all the elements holds the weight's middle element, so the owners run in order, each a
/// contiguous run of weights, and no replica owns more than `total / replicas` plus the largest
/// weight.
pub fn owners(elements: &[usize], replicas: usize) -> Vec<usize> {
    let total: u128 = elements.iter().map(|&n| n as u128).sum();
    let mut before = 0u128;
    elements
        .iter()
        .map(|&n| {
            // Twice the middle element's index, against twice the total.
            let middle_twice = 2 * before + n as u128;
            before += n as u128;
            match total {
                0 => 0,
                _ => ((middle_twice * replicas as u128 / (2 * total)) as usize)
                    .min(replicas.saturating_sub(1)),
            }
        })
        .collect()
}

/// The share of all the trained elements each replica owns ([`owners`]): what it holds of the
/// optimiser's moments.
pub fn owned_shares(elements: &[usize], replicas: usize) -> Vec<f64> {
    let total: usize = elements.iter().sum();
    let mut owned = vec![0usize; replicas];
    for (n, owner) in elements.iter().zip(owners(elements, replicas)) {
        owned[owner] += n;
    }
    owned
        .iter()
        .map(|&n| n as f64 / total.max(1) as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{on_each, owners};

    /// Owners run in order, each replica's share is at most an equal share plus the largest
    /// weight, and equal weights are dealt out evenly.
    #[test]
    fn owners_are_contiguous_and_near_equal() {
        assert_eq!(owners(&[10; 8], 4), [0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(owners(&[10; 3], 1), [0, 0, 0]);
        assert_eq!(owners(&[], 3), Vec::<usize>::new());
        // A model's shape: a large embedding first, layers of mixed sizes, a large head last.
        let mut elements = vec![4_096_000];
        for _ in 0..6 {
            elements.extend([
                256, 65_536, 16_384, 16_384, 65_536, 256, 196_608, 196_608, 196_608,
            ]);
        }
        elements.push(4_096_000);
        let largest = *elements.iter().max().unwrap();
        let total: usize = elements.iter().sum();
        for replicas in 1..=9 {
            let owner = owners(&elements, replicas);
            assert!(
                owner.windows(2).all(|w| w[0] <= w[1]),
                "{replicas}: {owner:?}"
            );
            assert!(owner.iter().all(|&o| o < replicas));
            for r in 0..replicas {
                let share: usize = (elements.iter().zip(&owner))
                    .filter(|(_, &o)| o == r)
                    .map(|(n, _)| n)
                    .sum();
                assert!(
                    share <= total / replicas + largest,
                    "{replicas}: replica {r}: {share}"
                );
            }
        }
        // Fewer weights than replicas: some own none.
        assert_eq!(owners(&[5, 5], 4), [1, 3]);
    }

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
