from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Grammar(_message.Message):
    __slots__ = ("kind", "spec")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Grammar.Kind]
        JSON_SCHEMA: _ClassVar[Grammar.Kind]
        JSON_OBJECT: _ClassVar[Grammar.Kind]
        REGEX: _ClassVar[Grammar.Kind]
        EBNF: _ClassVar[Grammar.Kind]
        STRUCTURAL_TAG: _ClassVar[Grammar.Kind]
    KIND_UNSPECIFIED: Grammar.Kind
    JSON_SCHEMA: Grammar.Kind
    JSON_OBJECT: Grammar.Kind
    REGEX: Grammar.Kind
    EBNF: Grammar.Kind
    STRUCTURAL_TAG: Grammar.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    kind: Grammar.Kind
    spec: str
    def __init__(self, kind: _Optional[_Union[Grammar.Kind, str]] = ..., spec: _Optional[str] = ...) -> None: ...
