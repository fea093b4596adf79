"""Learning outside execution: the decision log read back (``history``), one decision
explained (``explain``), re-decided as logged (``replay``) or under a candidate (``whatif``,
``whatif_budgets``), and the next intent proposed (``suggest``, with the rules of ``infer``,
the steps of ``steps`` and the budgets of ``budgets``, written by ``write``). Nothing here is
on the decision path: the PDP never imports this package."""
