-- What each ledger row's request asked of its model: generation, edit or variation (OpenAI
-- reports usage by the same sources). Rows written before edits existed were generations.
ALTER TABLE usage_ledger ADD COLUMN operation TEXT NOT NULL DEFAULT 'generation';
