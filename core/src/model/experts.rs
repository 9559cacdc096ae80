//! A mixture of experts' arithmetic on `ModelSpec`: where its router and experts sit
//! among the MLP's tensors, how many experts a step's tokens touch (uniform routing or
//! a measured one), the bytes they read and the parameters a token computes with.

use super::ModelSpec;

impl ModelSpec {
    /// Bytes of MLP weights a step actually reads, of `all` bytes in the layer's MLP:
    /// all of a dense MLP; for a mixture of experts the part every token uses (norm,
    /// router, shared expert) and the share of the experts that `rows` tokens are
    /// expected to be routed to (`expected_experts`), apportioned by parameters.
    pub fn mlp_bytes_read(&self, rows: u64, all: u64) -> u64 {
        if self.num_experts == 0 {
            return all;
        }
        let experts = (self.num_experts * self.expert_params()) as f64;
        let always = self.params().mlp_per_layer as f64 - experts + self.params().norms_per_layer as f64 / 2.0;
        let share = self.expected_experts(rows) / self.num_experts as f64;
        (all as f64 * (always + share * experts) / (always + experts)).round() as u64
    }

    /// How many distinct experts of a layer `tokens` tokens are expected to touch when
    /// each picks `experts_per_token` of `num_experts` uniformly: each expert is missed
    /// by one token with probability 1 − k/E, so by all with (1 − k/E)^tokens, and
    /// E·(1 − (1 − k/E)^tokens) are touched (k for one token, at most E). Real routers
    /// are skewed, which touches fewer: with a measured routing (`routing`), its shares.
    pub fn expected_experts(&self, tokens: u64) -> f64 {
        if self.num_experts == 0 {
            return 0.0;
        }
        if let Some(routing) = &self.routing {
            return routing.expected_experts(tokens);
        }
        let (e, k) = (self.num_experts as f64, self.experts_per_token as f64);
        let missed = (1.0 - k / e).powi(tokens.min(i32::MAX as u64) as i32);
        e * (1.0 - missed)
    }

    /// A mixture of experts' MLP tensors (`group_tensors` order) before the experts: the
    /// norm, the router and the shared expert if there is one — what must be read
    /// before a token's experts are known, and what every token uses.
    pub fn router_tensors(&self) -> std::ops::Range<usize> {
        let shared = if self.shared_expert_intermediate_size > 0 { ModelSpec::SHARED_EXPERT_TENSORS } else { 0 };
        0..2 + shared
    }

    /// The router among the MLP's tensors (after the norm).
    pub const ROUTER_TENSOR: usize = 1;

    /// Tensors of the shared expert: gate, down and up projections, then its gate's
    /// one row (a sigmoid of it scales the expert's output).
    pub const SHARED_EXPERT_TENSORS: usize = 4;

    /// The shared expert's tensors (`group_tensors` order), if the model has one.
    pub fn shared_expert_tensors(&self) -> Option<std::ops::Range<usize>> {
        (self.shared_expert_intermediate_size > 0).then_some(2..2 + ModelSpec::SHARED_EXPERT_TENSORS)
    }

    /// Tensors of each expert: gate, down and up projections.
    pub const TENSORS_PER_EXPERT: usize = 3;

    /// The MLP tensors (`group_tensors` order) of expert `expert`.
    pub fn expert_tensors(&self, expert: usize) -> std::ops::Range<usize> {
        let first = self.router_tensors().end + ModelSpec::TENSORS_PER_EXPERT * expert;
        first..first + ModelSpec::TENSORS_PER_EXPERT
    }

    /// The `count` experts of `layer` a plan keeps on the device (`Policy::hot_experts`),
    /// ascending: the most popular by the measured routing (ties to the lower expert),
    /// else the first `count` — under uniform routing every set is as good.
    pub fn hot_experts(&self, layer: u64, count: u64) -> Vec<usize> {
        self.popular_experts(layer, 0..count)
    }

    /// The experts a plan reads ahead with `layer`'s router part
    /// (`Policy::prefetched_experts`), ascending: the `count` next most popular after
    /// its `hot` ones.
    pub fn prefetched_experts(&self, layer: u64, hot: u64, count: u64) -> Vec<usize> {
        self.popular_experts(layer, hot..hot + count)
    }

    /// The experts of `layer` at places `ranks` of its popularity (most popular first,
    /// ties to the lower expert; expert order under uniform routing), ascending.
    fn popular_experts(&self, layer: u64, ranks: std::ops::Range<u64>) -> Vec<usize> {
        let end = ranks.end.min(self.num_experts) as usize;
        let start = (ranks.start as usize).min(end);
        if start == end {
            return Vec::new();
        }
        let shares = self.routing.as_ref().and_then(|r| r.layers.get(layer as usize));
        let mut order: Vec<usize> = (0..self.num_experts as usize).collect();
        if let Some(shares) = shares {
            let share = |e: usize| shares.get(e).copied().unwrap_or(0.0);
            order.sort_by(|&a, &b| share(b).total_cmp(&share(a)).then(a.cmp(&b)));
        }
        let mut chosen = order[start..end].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Distinct experts outside each layer's `hot` kept ones that `tokens` tokens are
    /// expected to touch (what a routed read brings in): uniform routing's
    /// (E − hot)·(1 − (1 − k/E)^tokens), or with a measured routing the mean over the
    /// layers of Σ 1 − (1 − pₑ)^tokens over the experts outside the layer's hot set.
    pub fn expected_cold_experts(&self, tokens: u64, hot: u64) -> f64 {
        if hot == 0 {
            return self.expected_experts(tokens);
        }
        let t = tokens.min(i32::MAX as u64) as i32;
        match &self.routing {
            Some(routing) => {
                let layer = |(l, shares): (usize, &Vec<f64>)| {
                    let kept = self.hot_experts(l as u64, hot);
                    let touched = |(e, p): (usize, &f64)| {
                        if kept.contains(&e) {
                            0.0
                        } else {
                            1.0 - (1.0 - p.clamp(0.0, 1.0)).powi(t)
                        }
                    };
                    shares.iter().enumerate().map(touched).sum::<f64>()
                };
                routing.layers.iter().enumerate().map(layer).sum::<f64>() / routing.layers.len().max(1) as f64
            }
            None => {
                let (e, k) = (self.num_experts as f64, self.experts_per_token as f64);
                (e - hot.min(self.num_experts) as f64) * (1.0 - (1.0 - k / e).powi(t))
            }
        }
    }

    /// The share of tokens' expert choices that `hot` kept experts per layer serve:
    /// hot/E under uniform routing, else their measured shares (mean over layers).
    pub fn hot_hit_rate(&self, hot: u64) -> f64 {
        if self.num_experts == 0 {
            return 0.0;
        }
        match &self.routing {
            Some(routing) => {
                let k = self.experts_per_token.max(1) as f64;
                let layer = |(l, shares): (usize, &Vec<f64>)| {
                    self.hot_experts(l as u64, hot).iter().map(|&e| shares.get(e).copied().unwrap_or(0.0)).sum::<f64>()
                        / k
                };
                routing.layers.iter().enumerate().map(layer).sum::<f64>() / routing.layers.len().max(1) as f64
            }
            None => hot.min(self.num_experts) as f64 / self.num_experts as f64,
        }
    }

    /// The most distinct experts `tokens` tokens can be routed to in one layer.
    pub fn most_experts(&self, tokens: u64) -> u64 {
        (tokens * self.experts_per_token).min(self.num_experts)
    }

    /// What `expected_experts` counts with, for people: "uniform routing" or "the
    /// measured routing".
    pub fn routing_name(&self) -> &'static str {
        if self.routing.is_some() {
            "the measured routing"
        } else {
            "uniform routing"
        }
    }

    /// Parameters of one expert (gate, up and down projections; 0 for a dense model).
    pub fn expert_params(&self) -> u64 {
        if self.num_experts == 0 {
            return 0;
        }
        3 * self.hidden_size * self.intermediate_size
    }

    /// Parameters of the shared expert (its projections and its gate; 0 without one).
    pub fn shared_expert_params(&self) -> u64 {
        let width = self.shared_expert_intermediate_size;
        if width == 0 {
            return 0;
        }
        3 * self.hidden_size * width + self.hidden_size
    }

    /// Parameters one token computes with: all of them but the experts it is not
    /// routed to (the total for a dense model).
    pub fn active_params(&self) -> u64 {
        let idle = self.num_experts.saturating_sub(self.experts_per_token);
        self.params().total - self.num_layers * idle * self.expert_params()
    }
}
