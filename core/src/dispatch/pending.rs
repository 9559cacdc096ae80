//! The memory that tasks earlier in program order have yet to acquire, per pool: what
//! a later task that overtakes them must leave free (the dispatch rule's reservation).
//!
//! Kept per pool over the tasks that acquire there only (copies, mostly; a graph's
//! computes acquire nothing), as remaining bytes in id order with a Fenwick tree of
//! their prefix sums and a cursor at the lowest one not yet started. A task that does
//! not overtake anything — the cursor is at or past it — costs one comparison.

use crate::graph::TaskGraph;

use super::PoolSlots;

/// Storage reused from graph to graph (see `DispatchTables`).
#[derive(Default)]
pub(super) struct PendingTables {
    ids: Vec<u32>,
    remaining_bytes: Vec<u64>,
    tree: Vec<u64>,
    pool_start: Vec<usize>,
    cursor: Vec<usize>,
}

/// Bytes each pool's not-yet-started acquirers need, by task id.
pub(super) struct PendingAcquires {
    tables: PendingTables,
}

impl PendingAcquires {
    /// Every task's acquisitions, all pending; a task acquiring twice in one pool counts
    /// once with the sum.
    pub(super) fn new(graph: &TaskGraph, slots: &PoolSlots, tables: PendingTables) -> PendingAcquires {
        let PendingTables { mut ids, mut remaining_bytes, mut tree, mut pool_start, mut cursor } = tables;
        let pools = graph.pools.len();
        pool_start.clear();
        pool_start.resize(pools + 1, 0);
        let mut last_counted = vec![u32::MAX; pools];
        for (id, task) in graph.tasks.iter().enumerate() {
            for m in &task.acquire {
                let p = slots.index(m.pool);
                if last_counted[p] != id as u32 {
                    last_counted[p] = id as u32;
                    pool_start[p + 1] += 1;
                }
            }
        }
        for p in 0..pools {
            pool_start[p + 1] += pool_start[p];
        }
        let total = pool_start[pools];
        ids.clear();
        ids.resize(total, u32::MAX);
        remaining_bytes.clear();
        remaining_bytes.resize(total, 0);
        // Filled in id order, so each pool's run is ascending; `cursor` is each pool's
        // fill position here and its lowest pending entry afterwards.
        cursor.clear();
        cursor.extend_from_slice(&pool_start[..pools]);
        for (id, task) in graph.tasks.iter().enumerate() {
            for m in &task.acquire {
                let p = slots.index(m.pool);
                let at = cursor[p];
                if at > pool_start[p] && ids[at - 1] == id as u32 {
                    remaining_bytes[at - 1] += m.bytes;
                } else {
                    ids[at] = id as u32;
                    remaining_bytes[at] = m.bytes;
                    cursor[p] += 1;
                }
            }
        }
        cursor.copy_from_slice(&pool_start[..pools]);
        tree.clear();
        tree.extend_from_slice(&remaining_bytes);
        for p in 0..pools {
            build_fenwick(&mut tree[pool_start[p]..pool_start[p + 1]]);
        }
        PendingAcquires { tables: PendingTables { ids, remaining_bytes, tree, pool_start, cursor } }
    }

    pub(super) fn into_tables(self) -> PendingTables {
        self.tables
    }

    /// Bytes that tasks before `task` (in id order) have yet to acquire in pool `p`.
    #[inline]
    pub(super) fn before(&self, p: usize, task: u32) -> u64 {
        let t = &self.tables;
        let (start, end) = (t.pool_start[p], t.pool_start[p + 1]);
        let cursor = t.cursor[p];
        if cursor == end || t.ids[cursor] >= task {
            return 0;
        }
        // Entries of this pool with an id below `task`: a prefix of its run.
        let count = t.ids[start..end].partition_point(|&id| id < task);
        prefix_sum(&t.tree[start..end], count)
    }

    /// `task` started: its acquisitions are no longer pending.
    pub(super) fn started(&mut self, p: usize, task: u32) {
        let t = &mut self.tables;
        let (start, end) = (t.pool_start[p], t.pool_start[p + 1]);
        let Ok(at) = t.ids[start..end].binary_search(&task) else { return };
        let bytes = std::mem::take(&mut t.remaining_bytes[start + at]);
        if bytes > 0 {
            subtract(&mut t.tree[start..end], at, bytes);
        }
        while t.cursor[p] < end && t.remaining_bytes[t.cursor[p]] == 0 {
            t.cursor[p] += 1;
        }
    }
}

/// Turns values into a Fenwick tree in place (entry i covers the `i & -i`-long run of
/// 1-based positions ending at i + 1).
fn build_fenwick(tree: &mut [u64]) {
    for i in 0..tree.len() {
        let parent = i | (i + 1);
        if parent < tree.len() {
            tree[parent] += tree[i];
        }
    }
}

/// Sum of the first `count` values.
fn prefix_sum(tree: &[u64], count: usize) -> u64 {
    let (mut sum, mut i) = (0, count);
    while i > 0 {
        sum += tree[i - 1];
        i &= i - 1;
    }
    sum
}

fn subtract(tree: &mut [u64], at: usize, bytes: u64) {
    let mut i = at;
    while i < tree.len() {
        tree[i] -= bytes;
        i |= i + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenwick_prefix_sums_match_a_plain_sum_after_updates() {
        let mut values: Vec<u64> = (0..37).map(|i| (i * 7919 % 101) as u64).collect();
        let mut tree = values.clone();
        build_fenwick(&mut tree);
        for at in [0usize, 5, 36, 17, 5] {
            let bytes = values[at];
            values[at] = 0;
            subtract(&mut tree, at, bytes);
            for count in 0..=values.len() {
                assert_eq!(prefix_sum(&tree, count), values[..count].iter().sum::<u64>(), "count {count}");
            }
        }
    }
}
