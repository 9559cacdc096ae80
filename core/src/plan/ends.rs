//! Where a plan may put the model's two ends: the head in memory (every step
//! multiplies by all of it), the embedding table also on disk, where each lookup reads
//! only its tokens' rows (`Policy::embeddings`).

use super::{Policy, Tier};
use crate::error::{CoreError, Result};
use crate::model::{ModelSpec, WeightLayout};

impl Policy {
    pub(super) fn validate_ends(&self, model: &ModelSpec) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("plan: {m}")));
        if self.head == Tier::Disk {
            return fail(
                "the head lives on the device or the host, not on disk: every step multiplies by all of it".into(),
            );
        }
        if self.embeddings == Tier::Disk {
            // A lookup reads its tokens' rows from the file; a tied head needs the whole
            // table every step, and a speculating round looks up tokens the draft guesses.
            if model.tie_word_embeddings {
                return fail(format!(
                    "embeddings: disk, but {} ties its head to the embeddings, which every step multiplies by \
                     whole: place the embeddings with the head",
                    model.name
                ));
            }
            if self.speculation.is_some() {
                return fail(
                    "embeddings: disk is for plans without speculation: place the embeddings on the device \
                             or the host"
                        .into(),
                );
            }
            let table = WeightLayout::token_embedding_of(model, &self.weight_format);
            if !table.rows_contiguous() {
                return fail(format!(
                    "embeddings: disk reads rows of the table alone, but {} quantizes groups of its rows together: \
                     place the embeddings on the device or the host",
                    table.name()
                ));
            }
        }
        Ok(())
    }
}
