from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    MISSING_IMAGE: _ClassVar[ErrorCode]
    INVALID_IMAGE: _ClassVar[ErrorCode]
    IMAGE_TOO_LARGE: _ClassVar[ErrorCode]
    INVALID_PROMPT: _ClassVar[ErrorCode]
    SCORING_FAILED: _ClassVar[ErrorCode]
    COMPONENT_FAILED: _ClassVar[ErrorCode]
    NOT_SENT: _ClassVar[ErrorCode]
    SHARED_MEMORY_UNAVAILABLE: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
MISSING_IMAGE: ErrorCode
INVALID_IMAGE: ErrorCode
IMAGE_TOO_LARGE: ErrorCode
INVALID_PROMPT: ErrorCode
SCORING_FAILED: ErrorCode
COMPONENT_FAILED: ErrorCode
NOT_SENT: ErrorCode
SHARED_MEMORY_UNAVAILABLE: ErrorCode

class RawImage(_message.Message):
    __slots__ = ("height", "width", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SharedMemoryImage(_message.Message):
    __slots__ = ("segment", "offset", "height", "width")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    height: int
    width: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("id", "prompt", "encoded", "raw", "shared_memory")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    encoded: bytes
    raw: RawImage
    shared_memory: SharedMemoryImage
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedMemoryImage, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("samples", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    options: _containers.ScalarMap[str, str]
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SampleError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("label", "area_fraction", "label_confidence", "likelihood")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    label: str
    area_fraction: float
    label_confidence: float
    likelihood: float
    def __init__(self, label: _Optional[str] = ..., area_fraction: _Optional[float] = ..., label_confidence: _Optional[float] = ..., likelihood: _Optional[float] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("id", "reward", "components", "caption", "segments", "error", "component_errors")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    reward: float
    components: _containers.ScalarMap[str, float]
    caption: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    error: SampleError
    component_errors: _containers.RepeatedCompositeFieldContainer[ComponentError]
    def __init__(self, id: _Optional[str] = ..., reward: _Optional[float] = ..., components: _Optional[_Mapping[str, float]] = ..., caption: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., error: _Optional[_Union[SampleError, _Mapping]] = ..., component_errors: _Optional[_Iterable[_Union[ComponentError, _Mapping]]] = ...) -> None: ...

class ComponentError(_message.Message):
    __slots__ = ("component", "required", "code", "message")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    component: str
    required: bool
    code: ErrorCode
    message: str
    def __init__(self, component: _Optional[str] = ..., required: _Optional[bool] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("reward_name", "application", "model_ids", "fingerprint", "server_version")
    REWARD_NAME_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    reward_name: str
    application: str
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: str
    server_version: str
    def __init__(self, reward_name: _Optional[str] = ..., application: _Optional[str] = ..., model_ids: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "reward_name", "provenance", "component_provenance")
    class ComponentProvenanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Provenance
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REWARD_NAME_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SampleResult]
    reward_name: str
    provenance: Provenance
    component_provenance: _containers.MessageMap[str, Provenance]
    def __init__(self, results: _Optional[_Iterable[_Union[SampleResult, _Mapping]]] = ..., reward_name: _Optional[str] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., component_provenance: _Optional[_Mapping[str, Provenance]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("role", "source", "revision")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    role: str
    source: str
    revision: str
    def __init__(self, role: _Optional[str] = ..., source: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class OptionInfo(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class InputResolution(_message.Message):
    __slots__ = ("shortest_edge", "height", "width", "resample", "implementation")
    SHORTEST_EDGE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESAMPLE_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    shortest_edge: int
    height: int
    width: int
    resample: str
    implementation: str
    def __init__(self, shortest_edge: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., resample: _Optional[str] = ..., implementation: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("name", "description", "min_reward", "max_reward", "higher_is_better", "models", "max_samples_per_request", "max_request_bytes", "max_image_pixels", "max_batch_size", "options", "config_json", "provenance", "input_resolution", "shared_memory_host")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MIN_REWARD_FIELD_NUMBER: _ClassVar[int]
    MAX_REWARD_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    INPUT_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_HOST_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    min_reward: float
    max_reward: float
    higher_is_better: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_samples_per_request: int
    max_request_bytes: int
    max_image_pixels: int
    max_batch_size: int
    options: _containers.RepeatedCompositeFieldContainer[OptionInfo]
    config_json: str
    provenance: Provenance
    input_resolution: InputResolution
    shared_memory_host: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., min_reward: _Optional[float] = ..., max_reward: _Optional[float] = ..., higher_is_better: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_samples_per_request: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., options: _Optional[_Iterable[_Union[OptionInfo, _Mapping]]] = ..., config_json: _Optional[str] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., input_resolution: _Optional[_Union[InputResolution, _Mapping]] = ..., shared_memory_host: _Optional[str] = ...) -> None: ...
