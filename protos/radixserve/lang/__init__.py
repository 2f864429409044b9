"""radixserve.lang: a Python-embedded language for generation programs (SGLang's frontend
language), run against a radixserve server's native routes.

    from radixserve.lang import RuntimeEndpoint, assistant, function, gen, set_default_backend, user

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    set_default_backend(RuntimeEndpoint("http://127.0.0.1:8000"))
    print(qa.run(question="What is a radix tree?")["answer"])

See docs/frontend.md.
"""

from radixserve.lang.api import assistant, gen, select, system, user
from radixserve.lang.backend import RuntimeEndpoint, ServerError
from radixserve.lang.interpreter import ProgramState, ProgramStateGroup
from radixserve.lang.program import Function, function, get_default_backend, set_default_backend
from radixserve.lang.template import ChatTemplate, TemplateError

__all__ = [
    "ChatTemplate",
    "Function",
    "ProgramState",
    "ProgramStateGroup",
    "RuntimeEndpoint",
    "ServerError",
    "TemplateError",
    "assistant",
    "function",
    "gen",
    "get_default_backend",
    "select",
    "set_default_backend",
    "system",
    "user",
]
