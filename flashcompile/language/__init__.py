"""The rule language: element-wise fp32 math on named states (the DSL), its trace into sympy with
the proofs of each state's fact, and the error envelopes the property tests hold a rule to."""
