"""Which component a proposal mutates: round-robin over prompts, with code mutations scheduled in.

With ``prompts_per_code = N`` every N prompt mutations are followed by one code
mutation (``_code``). Every ``decay_every`` iterations N grows by one, so code
changes, which are slow and costly, become rarer as the run matures; after
``code_cutoff`` iterations only prompts are mutated. ``prompts_per_code = 0``
means code mutations only (when allowed). A code-only run (``mutate = "code"``)
has nothing left to propose past the cutoff: :meth:`ComponentSelector.exhausted`
says so and the engine ends the run there, rather than mutating prompts it was
told to leave alone.
"""

from __future__ import annotations

from codeevolver.types import CODE_COMPONENT


class ComponentSelector:
    def __init__(
        self,
        mutate: str = "both",
        prompts_per_code: int = 1,
        decay_every: int | None = None,
        code_cutoff: int | None = None,
    ) -> None:
        self.mutate = mutate
        self.prompts_per_code = prompts_per_code
        self.decay_every = decay_every
        self.code_cutoff = code_cutoff
        self.prompts_since_code = 0
        self._next_prompt: dict[str, int] = {}

    def ratio(self, iteration: int) -> int:
        extra = iteration // self.decay_every if self.decay_every else 0
        return self.prompts_per_code + extra

    def code_allowed(self, iteration: int) -> bool:
        if self.mutate == "prompts":
            return False
        return self.code_cutoff is None or iteration < self.code_cutoff

    def exhausted(self, iteration: int) -> str | None:
        """Why no proposal can be made at ``iteration`` (a code-only run past its cutoff), or None."""
        if self.mutate == "code" and not self.code_allowed(iteration):
            return (
                f"code_cutoff_iteration {self.code_cutoff} reached with mutate = code: "
                "no code mutations are left to propose"
            )
        return None

    def choose(self, candidate_id: str, components: list[str], iteration: int) -> str:
        """Return the component name to mutate next, or ``_code``."""
        prompts = sorted(c for c in components if c != CODE_COMPONENT)
        if self.mutate == "code":
            reason = self.exhausted(iteration)
            if reason is not None:
                raise ValueError(reason)
            return CODE_COMPONENT
        use_code = self.code_allowed(iteration) and (not prompts or self.prompts_since_code >= self.ratio(iteration))
        if use_code:
            self.prompts_since_code = 0
            return CODE_COMPONENT
        if not prompts:
            raise ValueError("no prompt components to mutate and code mutations are off")
        position = self._next_prompt.get(candidate_id, 0)
        self._next_prompt[candidate_id] = position + 1
        self.prompts_since_code += 1
        return prompts[position % len(prompts)]

    def inherit(self, child_id: str, parent_id: str) -> None:
        """A child continues its parent's round-robin position."""
        self._next_prompt[child_id] = self._next_prompt.get(parent_id, 0)
