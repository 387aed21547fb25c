"""New intents from the field: out-of-scope traffic clustered for an operator, and a cluster the
operator names made a label of the task (`tandem intents clusters | name | page`)."""
