defmodule SseGateway.SSETest do
  use ExUnit.Case, async: true

  alias SseGateway.SSE

  defp parse(chunks) do
    {items, _} =
      Enum.reduce(chunks, {[], SSE.new()}, fn chunk, {acc, p} ->
        {items, p} = SSE.feed(p, chunk)
        {acc ++ items, p}
      end)

    items
  end

  @stream "retry: 2000\n\nid: E-0\n\nid: E-1\nevent: project_created\ndata: {\"a\":1}\n\n: keepalive\n\nid: E-2\ndata: x\ndata: y\n\n"

  test "a gateway stream, whole" do
    assert parse([@stream]) == [
             {:retry, 2000},
             {:id, "E-0"},
             {:event, %{id: "E-1", event: "project_created", data: "{\"a\":1}"}},
             {:event, %{id: "E-2", event: "message", data: "x\ny"}}
           ]
  end

  test "the same stream split at every byte gives the same items" do
    expected = parse([@stream])

    for at <- 0..byte_size(@stream) do
      <<a::binary-size(at), b::binary>> = @stream
      assert parse([a, b]) == expected, "split at #{at}"
    end

    assert parse(for <<c <- @stream>>, do: <<c>>) == expected
  end

  test "CRLF and CR line ends, a CR at a chunk's end, a BOM, fields without space" do
    assert parse(["\uFEFFid:1\r", "\nevent:e\rdata:d\r\n\r\n"]) == [
             {:event, %{id: "1", event: "e", data: "d"}}
           ]

    assert parse([<<0xEF, 0xBB>>, <<0xBF>> <> "id: 1\n\n"]) == [{:id, "1"}]
  end

  test "an id with NUL is ignored; retry takes digits only; unknown fields ignored" do
    assert parse(["id: a\0b\nretry: 1x\nfoo: bar\ndata: d\n\n"]) == [
             {:event, %{id: nil, event: "message", data: "d"}}
           ]
  end
end
