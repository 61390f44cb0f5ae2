defmodule SseGateway.JSONTest do
  use ExUnit.Case, async: true

  alias SseGateway.JSON.Native
  alias SseGateway.TestSupport.{Gateway, Helpers}

  describe "the native codec" do
    test "encodes compactly, escaping only what JSON requires" do
      assert Native.encode!(%{"a" => [1, 2.5, true, false, nil]}) ==
               ~s({"a":[1,2.5,true,false,null]})

      assert Native.encode!("é☃😀") == ~s("é☃😀")

      assert Native.encode!("q\"b\\s/n\nr\rt\tb\bf\f\u0001\u001f") ==
               ~s("q\\"b\\\\s/n\\nr\\rt\\tb\\bf\\f\\u0001\\u001f")

      assert Native.encode!(%{atom: :value}) == ~s({"atom":"value"})
      assert Native.encode!(1.0e100) == "1.0e100"
      assert Native.encode!(0.1) == "0.1"
      assert Native.encode!(-0) == "0"
      assert Native.encode!([]) == "[]"
      assert Native.encode!(%{}) == "{}"
      assert Native.encode!(~U[2026-01-02 03:04:05Z]) == ~s("2026-01-02T03:04:05Z")
      assert_raise ArgumentError, fn -> Native.encode!({:tuple}) end
      assert_raise ArgumentError, fn -> Native.encode!(<<0xFF>>) end
    end

    test "decodes what the gateway delivers: escapes, numbers, nesting, raw UTF-8" do
      assert Native.decode(
               ~s({"a":"\\u00e9\\/\\ud83d\\ude00","n":[1.0,1e2,-0,12345678901234567890,1.5E-3]})
             ) ==
               {:ok, %{"a" => "é/😀", "n" => [1.0, 100.0, 0, 12_345_678_901_234_567_890, 0.0015]}}

      assert Native.decode(~s( {"x" : [ {} , [] ,"é"] } )) == {:ok, %{"x" => [%{}, [], "é"]}}
      assert Native.decode(~s({"k":1,"k":2})) == {:ok, %{"k" => 2}}
      assert Native.decode("[[[[[[[[[[1]]]]]]]]]]") == {:ok, [[[[[[[[[[1]]]]]]]]]]}
    end

    test "refuses what is not JSON" do
      for bad <- [
            "",
            "{",
            ~s({"a"}),
            "[1,]",
            "01",
            "1.",
            "-",
            ~s("\\ud800"),
            ~s("a\nb"),
            "tru",
            "[1] x",
            ~s("\\x"),
            <<?", 0xFF, ?">>,
            String.duplicate("[", 600) <> String.duplicate("]", 600)
          ] do
        assert {:error, _} = Native.decode(bad), "accepted #{inspect(bad)}"
      end
    end

    test "round-trips" do
      term = %{"s" => "ü\u2028\"\\", "l" => [1, -2, 3.25, %{"n" => nil}], "b" => true}
      assert term |> Native.encode!() |> Native.decode() == {:ok, term}
    end
  end

  describe "against the gateway" do
    setup do
      gw = start_supervised!({Gateway, []})
      %{url: Gateway.url(gw)}
    end

    test "the gateway stores and delivers our encoding byte for byte, and we decode it back", %{
      url: url
    } do
      data = %{
        "text" => "é ☃ 😀 \"quoted\" back\\slash / tab\t nl\n cr\r ctl\u0001 \u2028",
        "numbers" => [0, -1, 1.5, 1.0e-7, 123_456_789_012_345_678, 3.0],
        "nested" => %{"a" => [%{"b" => [[], %{}]}], "t" => true, "f" => false, "z" => nil}
      }

      # Written out by hand, not by the codec under test (small maps encode
      # in key order).
      expected =
        ~S({"nested":{"a":[{"b":[[],{}]}],"f":false,"t":true,"z":null},) <>
          ~S("numbers":[0,-1,1.5,1.0e-7,123456789012345678,3.0],) <>
          ~S("text":"é ☃ 😀 \"quoted\" back\\slash / tab\t nl\n cr\r ctl\u0001  "})

      assert Native.encode!(data) == expected
      assert {:ok, _id} = SseGateway.publish("json:bytes", "bytes", data, url: url, mode: :sync)

      [event] = Helpers.raw_events(url, "/topics/json:bytes?last_event_id=0", 1)
      assert event.data == expected
      assert Native.decode(event.data) == {:ok, data}
    end

    test "escapes and number texts the gateway keeps as sent are decoded", %{url: url} do
      body =
        ~s({"topics":["json:text"],"event":"t","data":{"e":"\\u00e9\\/","one":1.0,"hundred":1e2,"big":1E+2}})

      assert {:ok, 201, _, _} =
               SseGateway.HTTP.request(:post, "/publish", body, [], Helpers.cfg(url))

      [event] = Helpers.raw_events(url, "/topics/json:text?last_event_id=0", 1)
      assert event.data == ~s({"e":"\\u00e9\\/","one":1.0,"hundred":1e2,"big":1E+2})

      assert Native.decode(event.data) ==
               {:ok, %{"e" => "é/", "one" => 1.0, "hundred" => 100.0, "big" => 100.0}}
    end
  end

  test "the codec in use is Elixir's JSON on 1.18+, else Jason when loaded, else ours" do
    expected =
      cond do
        Version.match?(System.version(), ">= 1.18.0") -> JSON
        Code.ensure_loaded?(Jason) -> Jason
        true -> SseGateway.JSON.Native
      end

    assert SseGateway.JSON.pick() == expected
  end
end
